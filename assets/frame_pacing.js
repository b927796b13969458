// Loaded first in the page's <head> (qlora_studio/ui/page_head.py), before Gradio's own scripts.
// Gradio 6 leaves requestAnimationFrame loops running for good once a status tracker or a
// spinner unmounts mid-animation (the app's own loading tracker always does), so an idle page
// renders 60 frames a second: 5-10% of a core in Chromium, taken from training on a small CPU.
// A chain of frames (a callback asking for the next frame) that has run for LONG_CHAIN_MS
// without the user touching the page is paced to IDLE_FPS. Short animations and anything the
// user is interacting with keep the browser's full rate, and paced loops still advance.
(() => {
  const IDLE_FPS = 4;
  const LONG_CHAIN_MS = 1000;
  const ACTIVE_MS = 2000;
  const nativeRequest = window.requestAnimationFrame.bind(window);
  const nativeCancel = window.cancelAnimationFrame.bind(window);
  const paced = new Map(); // our id (negative, never a native id) -> {timeout, frame}
  let activeUntil = 0;
  let nextId = 1;
  let runningChainStart = null; // start time of the chain whose callback is running now

  const wake = () => { activeUntil = performance.now() + ACTIVE_MS; };
  for (const type of ["pointerdown", "pointermove", "keydown", "wheel", "touchstart", "focusin"]) {
    window.addEventListener(type, wake, { capture: true, passive: true });
  }

  const inChain = (chainStart, callback) => (time) => {
    const outer = runningChainStart;
    runningChainStart = chainStart;
    try {
      callback(time);
    } finally {
      runningChainStart = outer;
    }
  };

  window.requestAnimationFrame = (callback) => {
    const now = performance.now();
    const chainStart = runningChainStart ?? now;
    if (now < activeUntil || now - chainStart < LONG_CHAIN_MS) return nativeRequest(inChain(chainStart, callback));
    const id = -nextId++;
    const entry = { timeout: 0, frame: 0 };
    entry.timeout = setTimeout(() => {
      entry.frame = nativeRequest((time) => {
        paced.delete(id);
        inChain(chainStart, callback)(time);
      });
    }, 1000 / IDLE_FPS);
    paced.set(id, entry);
    return id;
  };

  window.cancelAnimationFrame = (id) => {
    const entry = paced.get(id);
    if (entry === undefined) return nativeCancel(id);
    clearTimeout(entry.timeout);
    if (entry.frame) nativeCancel(entry.frame);
    paced.delete(id);
  };
})();
