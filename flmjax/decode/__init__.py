"""Streaming full-duplex decoding: the official LMGen semantics for many sessions at once."""

from flmjax.decode.decoder import OVERFLOW_POLICIES, SessionOverflowError, StreamingDecoder
from flmjax.decode.sampling import SamplingConfig, StreamParams, repetition_penalty, sample
