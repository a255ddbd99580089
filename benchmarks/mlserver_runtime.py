"""The peer that `benchmarks/peers.py` times against our server: MLServer (Seldon's Open Inference
Protocol server) with a custom runtime over the same `lorasa_serve.Engine`, as a user who only needs
stateless inference would write it. Imported by MLServer from its own virtual environment
(`make peers-venv`); never by the service.

    model-settings.json: {"name": "lorasa_policy", "implementation": "benchmarks.mlserver_runtime.LorasaRuntime",
                          "parameters": {"uri": "<policy dir>", "extra": {"torch_threads": 1}}}

Inputs as on our /v2: agent_index INT64 [B], obs FP32 [B, obs_max], state FP32 [B, hidden] (recurrent
policies); outputs action, log_prob, state_out. Validation is the Engine's (the same protocol module).
"""
from __future__ import annotations

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from lorasa_serve import Engine


class LorasaRuntime(MLModel):
    async def load(self) -> bool:
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        torch.set_num_threads(int(extra.get("torch_threads", 1)))
        self.engine = Engine.from_dir(self.settings.parameters.uri, device="cpu")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        res = self.engine.act(x["agent_index"].reshape(-1), x["obs"], x.get("state"))
        outputs = [NumpyCodec.encode_output("action", res.actions.numpy()),
                   NumpyCodec.encode_output("log_prob", res.log_probs.numpy())]
        if res.state is not None:
            outputs.append(NumpyCodec.encode_output("state_out", res.state.numpy()))
        return InferenceResponse(model_name=self.name, outputs=outputs)

