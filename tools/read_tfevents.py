"""Reads a TensorBoard log directory with TensorBoard's own event reader and prints its scalars
as JSON, {tag: [[step, value], ...]}: the reference tests/ check zerokit's event files against.

    .deps/py/bin/python tools/read_tfevents.py LOGDIR
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
