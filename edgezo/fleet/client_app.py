"""The ClientApp: runs on each device's SuperNode and turns the server's messages into jobs on the
device's own edgezo daemon (edgezo/fleet/device.py). Its settings come from the SuperNode's
`--node-config` (device=, state-dir=, train=, eval=, socket=, budget=), never from the server:
which data a device trains on and which daemon runs it stay the device's business.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from edgezo.fleet.device import Device, DeviceConfig

app = ClientApp()


def _device(msg: Message, context: Context) -> tuple[Device, dict]:
    device = Device(DeviceConfig.from_node_config(dict(context.node_config)))
    c = dict(msg.content["fleet"])
    device.sync(json.loads(c["spec"]) if c.get("spec") else None,
                json.loads(c["header"]) if c.get("header") else None, int(c["log-from"]), c["log"])
    return device, c


def _reply(msg: Message, device: Device, out: dict) -> Message:
    out = {k: v for k, v in out.items() if v is not None}
    out.update(device=device.cfg.name, **{"log-steps": device.log.steps})
    return Message(RecordDict({"fleet": ConfigRecord(out)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    device, c = _device(msg, context)
    out = device.train_round(int(c["round"]), int(c["steps"]), int(c["fed-seed"]), bool(c.get("want-header")))
    return _reply(msg, device, out)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    device, c = _device(msg, context)
    return _reply(msg, device, device.finish(int(c.get("eval-size", 0))))
