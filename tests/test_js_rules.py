"""The schedule rules the frontend computes in the page (js/taca_rules.js), run under Node and compared with the
Python the server runs: ``TacaSettings.gamma_at`` (window and ramp) and ``format_blocks`` from taca/settings.py,
and the nominal schedule with ComfyUI's own `simple` scheduler.

Node (/usr/bin/node, or ``TACA_NODE``) is part of the test machine: without it these tests fail, they do not skip.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import subprocess

import pytest

from conftest import REPO
from taca.settings import RAMPS, TacaSettings, format_blocks, parse_blocks

RULES = os.path.join(REPO, "js", "taca_rules.js")
NODE = os.environ.get("TACA_NODE") or shutil.which("node") or "/usr/bin/node"

# Reads [[function name, [arguments]], ...] as JSON on stdin and writes the results, in order, as JSON.
RUNNER = """
const rules = await import(process.env.TACA_RULES_URL);
let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map(([name, args]) => {
    if (typeof rules[name] !== "function") throw new Error(`taca_rules.js exports no function ${name}`);
    return rules[name](...args);
});
process.stdout.write(JSON.stringify(results));
"""


@pytest.fixture(scope="module")
def js(tmp_path_factory):
    """Calls functions of js/taca_rules.js under Node: ``js([(name, args), ...])`` -> their results."""
    if not os.path.isfile(NODE) or not os.access(NODE, os.X_OK):
        pytest.fail(f"Node.js is missing ({NODE}): it runs the frontend's rules in these tests. Install nodejs "
                    "(scripts/setup_runtime.sh does, as root) or point TACA_NODE at a node binary.")
    # an .mjs copy: Node 20 loads a plain .js file outside a "type": "module" package as CommonJS. The copy
    # works because the module imports nothing.
    module = tmp_path_factory.mktemp("js_rules") / "taca_rules.mjs"
    shutil.copyfile(RULES, module)

    def call(calls):
        proc = subprocess.run([NODE, "--input-type=module", "-e", RUNNER], input=json.dumps(calls),
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TACA_RULES_URL": module.as_uri()})
        assert proc.returncode == 0, proc.stderr
        results = json.loads(proc.stdout)
        assert len(results) == len(calls)
        return results

    return call


def test_node_runs_the_module_and_fails_on_a_missing_function(js):
    assert js([("formatBlocks", [[0, 1, 2]])]) == ["0-2"]
    with pytest.raises(AssertionError, match="exports no function gamma_at"):
        js([("gamma_at", [{}, 0.5])])


# ------------------------------------------------------------------------------------------ window and ramp

GAMMAS = [0.1, 0.5, 0.97, 1.0, 1.15, 1.2, 1.5, 3.0]
SIGMA_ENDS = [0.0, 0.3, 0.8, 0.97, 1.0]
SIGMA_STARTS = [None, 0.0, 0.5, 0.8, 0.97, 0.99, 1.0]


@functools.lru_cache(maxsize=None)
def nominal_positions():
    """ComfyUI's simple scheduler over SD3's flow sampling, 30 steps: the sigmas the plot uses before a run."""
    return tuple(comfy_simple_sigmas(30))


def positions_for(sigma_end, sigma_start):
    """Step positions over [0, 1], with the window's edges, the doubles next to them, and points inside."""
    points = {0.0, 1.0, 0.5, 0.25, 0.75, 0.999, 0.001, *nominal_positions()}
    for edge in (sigma_end, sigma_start):
        if edge is None:
            continue
        points.update({edge, math.nextafter(edge, -math.inf), math.nextafter(edge, math.inf)})
    if sigma_start is not None:
        points.update(sigma_end + (sigma_start - sigma_end) * w for w in (0.1, 1 / 3, 0.5, 0.9))
    return sorted(p for p in points if -0.01 <= p <= 1.01)


def settings_grid():
    for gamma in GAMMAS:
        for sigma_end in SIGMA_ENDS:
            for sigma_start in SIGMA_STARTS:
                for ramp in RAMPS if sigma_start is not None else ["constant"]:
                    yield TacaSettings(gamma, sigma_end, "exact", sigma_start, ramp)


def as_js(settings: TacaSettings):
    return {"gamma": settings.gamma, "sigmaEnd": settings.sigma_end, "sigmaStart": settings.sigma_start,
            "ramp": settings.ramp}


def test_gamma_at_is_the_servers_over_a_grid_of_settings_and_positions(js):
    cases = [(s, p) for s in settings_grid() for p in positions_for(s.sigma_end, s.sigma_start)]
    assert len(cases) > 5000
    got = js([("gammaAt", [as_js(s), p]) for s, p in cases])
    wrong = []
    for (settings, position), value in zip(cases, got):
        expected = settings.gamma_at(position)
        # the same IEEE operations in the same order; cosine goes through each runtime's own cos()
        same = value == expected if settings.ramp != "cosine" else math.isclose(value, expected, rel_tol=0, abs_tol=1e-12)
        if not same or (value == 1.0) != (expected == 1.0):
            wrong.append((settings, position, value, expected))
    assert wrong == [], f"{len(wrong)} of {len(cases)} differ, e.g. {wrong[:5]}"
    # the grid reaches every branch: off, constant, and a ramp strictly between 1 and gamma
    values = {(s.ramp, v == 1.0, v == s.gamma) for (s, _), v in zip(cases, got)}
    for ramp in RAMPS:
        assert {(ramp, True, False), (ramp, False, True)} <= values, ramp
        assert ((ramp, False, False) in values) == (ramp != "constant"), ramp


def test_gamma_at_window_edges_on_the_nominal_schedule(js):
    """The Advanced node's edges: sigma_end and sigma_start are in the window, the doubles outside them are not."""
    settings = TacaSettings(1.5, 0.8, "exact", 0.99, "linear")
    end, start = settings.sigma_end, settings.sigma_start
    probes = [math.nextafter(end, -1), end, math.nextafter(end, 2), math.nextafter(start, -1), start,
              math.nextafter(start, 2)]
    got = js([("gammaAt", [as_js(settings), p]) for p in probes])
    assert got == [settings.gamma_at(p) for p in probes]
    assert got[0] == 1.0 and got[1] == 1.0 and 1.0 < got[2] < got[3] < got[4] == 1.5 and got[5] == 1.0


# ------------------------------------------------------------------------------------------ nominal schedule

def comfy_simple_sigmas(steps):
    """ComfyUI's own `simple` schedule, ``steps`` steps, on an SD3 flow model (shift 3.0)."""
    import comfy.model_sampling
    import comfy.samplers
    import comfy.supported_models

    class Sampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    sampling = Sampling(comfy.supported_models.SD3({}))
    return comfy.samplers.calculate_sigmas(sampling, "simple", steps).tolist()


@pytest.mark.parametrize("steps", [1, 3, 7, 20, 30, 50])
def test_nominal_sigmas_are_comfyuis_simple_scheduler_on_sd3(js, steps):
    (got,) = js([("nominalSigmas", [steps, 3.0])])
    assert got == pytest.approx(comfy_simple_sigmas(steps), abs=1e-6)  # ComfyUI's are float32


def test_nominal_sigmas_default_to_the_plots_30_steps(js):
    default, thirty = js([("nominalSigmas", []), ("nominalSigmas", [30, 3.0])])
    assert default == thirty and len(default) == 31 and default[-1] == 0


# ------------------------------------------------------------------------------------------ runs of indices

BLOCK_TEXTS = ["", "0", "5", "0-9,15", "3,1,2", "0-2,5", "5,5,5", "0-0", " 7 - 9 , 1", "0,2,4,6", "1,2,4,5,7",
               "10-12,13,20-21", "0-56", "0-1023", "1,5-6", "0-1,3-4,6-7"]


@pytest.mark.parametrize("text", BLOCK_TEXTS)
def test_format_blocks_is_the_servers_for_blocks_texts(js, text):
    blocks = parse_blocks(text)
    # as a sorted list, and shuffled with repeats (the frontend's step lists are built in order, the rule sorts)
    shuffled = list(blocks) * 2
    random.Random(len(text)).shuffle(shuffled)
    got = js([("formatBlocks", [list(blocks)]), ("formatBlocks", [shuffled])])
    assert got == [format_blocks(blocks)] * 2
    assert parse_blocks(got[0]) == blocks


def test_format_blocks_is_the_servers_for_random_sets(js):
    rng = random.Random(0)
    sets = [sorted(rng.sample(range(60), rng.randint(0, 40))) for _ in range(300)]
    got = js([("formatBlocks", [s]) for s in sets])
    assert got == [format_blocks(s) for s in sets]
    assert [parse_blocks(g) for g in got] == [tuple(s) for s in sets]
