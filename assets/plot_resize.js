// Loaded first in the page's <head> (qlora_studio/ui/page_head.py), before Gradio's own scripts.
// Gradio's plot component calls Plotly.react and then Plotly.Plots.resize on every new value.
// For an autosized plot, resize waits 100 ms and relayouts, recomputing the whole figure's
// defaults a second time even when the plot's box has not changed, which is every time while
// the loss chart follows a run. Skip that second pass when the drawn size already matches the
// element; a real resize (window, tab, layout) still goes through Plotly's own code.
(() => {
  let plotly;

  const patch = (Plotly) => {
    const resize = Plotly?.Plots?.resize;
    if (typeof resize !== "function" || resize.qlorastudio) return;
    const sameSize = function (gd) {
      const self = this;
      const args = arguments;
      // Looked at after the browser has laid the page out (as Plotly's own resize does after 100 ms):
      // reading sizes right after Gradio changed the page would force an extra layout.
      return new Promise((resolve, reject) => setTimeout(() => {
        const el = typeof gd === "string" ? document.getElementById(gd) : gd;
        const drawn = el?._fullLayout;
        // Hidden by now (the user went to another tab): nothing to fit, as Plotly's own timer decides.
        const hidden = !el?.isConnected || el.offsetParent === null || el.clientWidth === 0;
        if (hidden || (drawn && Math.round(drawn.width) === el.clientWidth &&
                       Math.round(drawn.height) === el.clientHeight)) {
          resolve(el);
        } else {
          resize.apply(self, args).then(resolve, reject);
        }
      }, 100));
    };
    sameSize.qlorastudio = true;
    Plotly.Plots.resize = sameSize;
  };

  // Gradio's plotly chunk sets window.Plotly when the first plot loads: patch it as it arrives.
  Object.defineProperty(window, "Plotly", {
    configurable: true,
    get: () => plotly,
    set: (value) => {
      plotly = value;
      try {
        patch(value);
      } catch (error) {
        setTimeout(() => { throw error; }); // reported, and the plot keeps Plotly's own resize
      }
    },
  });
})();
