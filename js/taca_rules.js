// The rules the schedule plot computes in the page, live while a widget is dragged: each is the rule of
// taca/settings.py (or ComfyUI's scheduler) that the server applies in the run, written once more because the
// plot cannot wait for a run. tests/test_js_rules.py runs this module under Node over a grid of inputs and
// compares every function with the Python it mirrors.
//
// No imports and no side effects: js/taca.js imports it, and the frontend, which loads every .js file of the
// pack's WEB_DIRECTORY as an extension, finds nothing to run in it.

/** gamma 1 leaves every logit unchanged: TACA does nothing (taca/settings.py GAMMA_OFF). */
export const GAMMA_OFF = 1;

/** The nominal schedule the plot shows before a run: ComfyUI's `simple` scheduler, 30 steps, SD3 shift 3.0. */
export const NOMINAL_STEPS = 30;
export const NOMINAL_SHIFT = 3.0;

/** sigma of an SD3-style flow model (comfy.model_sampling.time_snr_shift) at time t in (0, 1]. */
export function flowSigma(t, shift = NOMINAL_SHIFT) {
  return (shift * t) / (1 + (shift - 1) * t);
}

/** ComfyUI's `simple` scheduler over a flow model with 1000 timesteps: `steps` sigmas, then 0. */
export function nominalSigmas(steps = NOMINAL_STEPS, shift = NOMINAL_SHIFT) {
  const stride = 1000 / steps; // the float arithmetic of comfy.samplers.simple_scheduler
  const sigmas = [];
  for (let i = 0; i < steps; i++) {
    sigmas.push(flowSigma((1000 - Math.floor(i * stride)) / 1000, shift));
  }
  sigmas.push(0);
  return sigmas;
}

/**
 * The gamma of a model call at `position` (TacaSettings.gamma_at): 1 outside the window
 * sigmaEnd <= position <= sigmaStart (no upper end when sigmaStart is null: the simple node), else gamma,
 * constant or falling from gamma at sigmaStart to 1 at sigmaEnd along a line ("linear") or a half cosine ("cosine").
 * `settings`: { gamma, sigmaEnd, sigmaStart = null, ramp = "constant" }.
 */
export function gammaAt(settings, position) {
  const { gamma, sigmaEnd, sigmaStart = null, ramp = "constant" } = settings;
  const active = gamma !== GAMMA_OFF && position >= sigmaEnd && (sigmaStart === null || position <= sigmaStart);
  if (!active) return GAMMA_OFF;
  if (ramp === "constant" || sigmaStart === null || sigmaStart <= sigmaEnd) return gamma;
  let weight = (position - sigmaEnd) / (sigmaStart - sigmaEnd);
  if (ramp === "cosine") weight = 0.5 - 0.5 * Math.cos(Math.PI * weight);
  return GAMMA_OFF + (gamma - GAMMA_OFF) * weight;
}

/** [0, 1, 2, 5] -> "0-2,5": the runs of consecutive indices (taca/settings.py format_blocks). */
export function formatBlocks(indices) {
  const sorted = [...new Set(indices)].sort((a, b) => a - b);
  const runs = [];
  for (const index of sorted) {
    const last = runs[runs.length - 1];
    if (last && index === last[1] + 1) last[1] = index;
    else runs.push([index, index]);
  }
  return runs.map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`)).join(",");
}
