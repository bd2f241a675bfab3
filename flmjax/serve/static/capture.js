// AudioWorklet: the microphone's samples in 1920-sample frames at 24 kHz (80 ms, one model frame
// each), posted to the page as Float32Arrays. In a context at another rate (browsers that will
// not feed a microphone into a 24 kHz context, e.g. Firefox) it resamples with a Hann-windowed
// sinc low-pass (16 taps of the slower rate on each side, cut-off at 95% of 12 kHz).
const OUT_RATE = 24000;

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frame = new Float32Array(1920);
    this.filled = 0;
    this.step = sampleRate / OUT_RATE;  // input samples per output sample
    this.half = Math.ceil(16 * Math.max(this.step, 1));  // taps on each side
    this.cut = 0.95 * Math.min(1, 1 / this.step);  // cut-off, a fraction of the input Nyquist
    this.kept = new Float32Array(0);  // input samples still needed; kept[0] is input index base
    this.base = 0;
    this.t = 0;  // the next output sample's time, in input samples
  }

  emit(x) {
    this.frame[this.filled++] = x;
    if (this.filled === this.frame.length) {
      this.port.postMessage(this.frame, [this.frame.buffer]);
      this.frame = new Float32Array(1920);
      this.filled = 0;
    }
  }

  resample(input) {
    const buf = new Float32Array(this.kept.length + input.length);
    buf.set(this.kept);
    buf.set(input, this.kept.length);
    const H = this.half, c = this.cut;
    while (Math.floor(this.t) + H < this.base + buf.length) {
      const center = Math.floor(this.t);
      let acc = 0;
      for (let k = center - H + 1; k <= center + H; k++) {
        const i = k - this.base;
        if (i < 0) continue;  // before the stream began: silence
        const d = this.t - k, x = Math.PI * c * d;
        const sinc = x === 0 ? 1 : Math.sin(x) / x;
        acc += buf[i] * c * sinc * (0.5 + 0.5 * Math.cos(Math.PI * d / H));
      }
      this.emit(acc);
      this.t += this.step;
    }
    const drop = Math.max(0, Math.floor(this.t) - H + 1 - this.base);
    this.kept = buf.subarray(drop);
    this.base += drop;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (input) {
      if (this.step === 1) {
        for (let i = 0; i < input.length; i++) this.emit(input[i]);
      } else {
        this.resample(input);
      }
    }
    return true;
  }
}

registerProcessor('flmjax-capture', Capture);
