"""What a trained run learned, on held-out data: the held-out sets (`heldout_sets`; their
teacher-forced accuracies next to the untrained model's are flmjax.train.evaluate.show), and
streaming chat on held-out conversations (`chat`). `flmjax main` prints these."""

from __future__ import annotations


def heldout_sets(tc) -> dict[str, tuple]:
  """Held-out evaluation sets: each is how one task lays out the held-out samples."""
  from flmjax.data.pipeline import SourceSpec

  sets = {'duplex (lead)': tc.eval_sources}
  if tc.corpus is not None:  # the synthetic corpus also holds held-out single-speaker samples
    tts_asr = tc.corpus.split('heldout_tts_asr')
    sets['ASR (listen, trail)'] = (SourceSpec(tts_asr, layout='trail', speech_stream='listen'),)
    lead = tc.eval_sources[0].offset_frames if tc.eval_sources else 0
    sets['TTS (speak, lead)'] = (SourceSpec(tts_asr, layout='lead', offset_frames=lead),)
  return sets


def chat(tc, result, limit: int = 64, attention_window: int | None = None) -> dict:
  """Streams each held-out duplex set (flmjax.data.corpus.HELDOUT_DUPLEX: standard, long pauses,
  2x slower, another seed and settings) through the decoder; prints transcripts of the standard
  set, then one table: exact answers and turn-taking per set (docs/evaluation.md).
  attention_window: each frame attends to the last N frames only (a ring cache of N positions;
  None: the whole conversation)."""
  from flax import nnx

  from flmjax.data.corpus import HELDOUT_DUPLEX
  from flmjax.data.tokenizer import load_tokenizer
  from flmjax.decode.decoder import StreamingDecoder
  from flmjax.decode.sampling import SamplingConfig
  from flmjax.eval.duplex import evaluate_duplex
  from flmjax.eval.report import sets_markdown
  from flmjax.eval.stream import read_conversations, stream_steps

  if tc.corpus is None:
    raise ValueError('held-out chat needs the synthetic corpus (TrainConfig.corpus)')
  tokenizer = load_tokenizer(tc.corpus.tokenizer)
  model = nnx.merge(result['spec'].graphdef, result['state'].params)
  cfg = model.cfg
  convs = {
    name: read_conversations(tc.corpus.manifest(name), cfg.num_codebooks, limit=limit)
    for name in HELDOUT_DUPLEX
  }
  sampling = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
  if attention_window is None:
    longest = stream_steps(cfg, max(c['user'].shape[1] for cs in convs.values() for c in cs))
    decoder = StreamingDecoder(model, sampling, max_len=longest)  # compiled once for every set
  else:
    decoder = StreamingDecoder(model, sampling, max_len=attention_window, overflow='slide')
  reports = {}
  for name, conversations in convs.items():
    reports[name] = evaluate_duplex(
      model, None, tokenizer, conversations=conversations, decoder=decoder, sampling=sampling
    )
  standard = reports['heldout_duplex']
  window = '' if attention_window is None else f', attending to the last {attention_window} frames'
  print(
    f'\nfull-duplex chat, greedy, {limit} held-out conversations a set, streamed as a batch'
    f'{window}:'
  )
  for conv in standard['conversations'][:3]:
    print(f'  [{conv["id"]}]')
    for turn in conv['turns']:
      print(
        f'    at {turn["frame"] * 0.08:5.2f} s  model: {turn["said"] or "(nothing)":16s} '
        f'(reference: {turn["reference"]})'
      )
  print(
    '\nturn-taking and exact answers per held-out set (docs/evaluation.md; FDB: '
    "Full-Duplex-Bench's takeover rule on the model's words):\n" + sets_markdown(reports)
  )
  for report in reports.values():  # heldout.json keeps the summaries, not the timelines
    for conv in report['conversations']:
      for key in ('model_active', 'user_active', 'text_ids', 'segments', 'words'):
        del conv[key]
  return reports
