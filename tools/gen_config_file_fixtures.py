"""Reference parses of configuration files for lib/config/files.rs (tests/config.rs), made by the
tools users already run on them:

    DS_ACCELERATOR=cpu .deps/py/bin/python tools/gen_config_file_fixtures.py

Reads the hand-written files in tests/fixtures/config/files/ and writes expected.json there:
  deepspeed  for each DeepSpeed config (*.json, *.hjson): the dict DeepSpeed 0.19.8's own
             DeepSpeedConfig loads from that path (hjson, with its duplicate-key check), or the
             error it raises;
  yaml       for each *.yaml: PyYAML's safe_load;
  nanogpt    for each *.py: the globals that nanoGPT's configurator gets by exec'ing the file.
"""
import glob
import json
import os
import types

import yaml
from deepspeed.runtime import config as ds_config
from deepspeed.runtime.config import DeepSpeedConfig

DIR = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "config", "files")


def deepspeed_parse(path):
    # DeepSpeedConfig asks deepspeed.comm for rank and world size: answer (0, 4) without a cluster (the guide's 4 GPUs).
    ds_config.dist = types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda *a, **k: 4)
    try:
        return {"ok": DeepSpeedConfig(path)._param_dict}
    except Exception as e:  # noqa: BLE001 - the refusal itself is the fixture
        return {"error": f"{type(e).__name__}: {e}"}


def nanogpt_globals(path):
    g = {}
    exec(open(path).read(), {}, g)  # what nanoGPT's configurator.py does with a config file
    return g


def main():
    out = {"deepspeed": {}, "yaml": {}, "nanogpt": {}}
    for p in sorted(glob.glob(os.path.join(DIR, "*"))):
        name = os.path.basename(p)
        if name == "expected.json":
            continue
        if name.endswith((".json", ".hjson")):
            out["deepspeed"][name] = deepspeed_parse(p)
        elif name.endswith((".yaml", ".yml")):
            out["yaml"][name] = yaml.safe_load(open(p))
        elif name.endswith(".py"):
            out["nanogpt"][name] = nanogpt_globals(p)
    with open(os.path.join(DIR, "expected.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
