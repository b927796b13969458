// Loaded first in the page's <head> (qlora_studio/ui/page_head.py), before Gradio's own scripts.
// Gradio 6 leaves requestAnimationFrame loops running for good once a status tracker or a
// spinner unmounts mid-animation (the app's own loading tracker always does), so an idle page
// renders 60 frames a second: 5-10% of a core in Chromium, taken from training on a small CPU.
// While nobody has touched the page for ACTIVE_MS, every frame callback waits for one shared
// frame IDLE_FPS times a second; any input restores the browser's full rate. Loops still
// advance, just slower, and all of them share one frame.
(() => {
  const IDLE_FPS = 1;
  const ACTIVE_MS = 2000;
  const nativeRequest = window.requestAnimationFrame.bind(window);
  const nativeCancel = window.cancelAnimationFrame.bind(window);
  const waiting = new Map(); // our id (negative, never a native id) -> callback
  let activeUntil = 0;
  let nextId = 1;
  let flushTimer = 0;

  const wake = () => { activeUntil = performance.now() + ACTIVE_MS; };
  for (const type of ["pointerdown", "pointermove", "keydown", "wheel", "touchstart", "focusin"]) {
    window.addEventListener(type, wake, { capture: true, passive: true });
  }

  const flush = (time) => {
    const batch = [...waiting.values()];
    waiting.clear(); // callbacks that ask for another frame now wait for the next shared one
    for (const callback of batch) {
      try {
        callback(time);
      } catch (error) {
        setTimeout(() => { throw error; }); // reported as the browser would, without stopping the batch
      }
    }
  };

  window.requestAnimationFrame = (callback) => {
    if (performance.now() < activeUntil) return nativeRequest(callback);
    const id = -nextId++;
    waiting.set(id, callback);
    if (!flushTimer) {
      flushTimer = setTimeout(() => {
        flushTimer = 0;
        nativeRequest(flush);
      }, 1000 / IDLE_FPS);
    }
    return id;
  };

  window.cancelAnimationFrame = (id) => {
    if (!waiting.delete(id)) nativeCancel(id);
  };
})();
