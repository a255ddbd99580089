"""The body of `PUT /v1/admin/adapters/{agent_id}` -> our adapter bytes, validated.

Accepted bodies (`lorasa_serve.peft_format` does the conversion and the validation):
  * our adapter safetensors (`adapters/<agent_id>.safetensors`), stored as sent;
  * a PEFT adapter as `multipart/form-data` with the parts `adapter_config` (adapter_config.json) and
    `adapter_model` (adapter_model.safetensors): converted, then stored in our layout, so every worker
    and replica loads the same bytes as for our own uploads.
A PEFT safetensors file alone is refused (400 PeftFormatError): its lora_alpha is only in the config.
"""
from __future__ import annotations

import asyncio

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from torch import Tensor

from lorasa_serve import peft_format
from lorasa_serve.spec import PolicySpec

from .schema import BadRequest, short

PARTS = ("adapter_config", "adapter_model")
SOURCE = "uploaded adapter"


async def adapter_bytes(request: Request, data: bytes, spec: PolicySpec, agent_id: str
                        ) -> tuple[bytes, dict[str, Tensor]]:
    """`data`: the whole body, already read within the upload limit -> (bytes to store, tensors)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "multipart/form-data":
        return await asyncio.to_thread(peft_format.canonical_bytes, data, spec, SOURCE, agent_id)
    parts = await _parts(request, data)
    return await asyncio.to_thread(peft_format.canonical_bytes, parts["adapter_model"], spec, SOURCE,
                                   agent_id, parts["adapter_config"])


async def _parts(request: Request, data: bytes) -> dict[str, bytes]:
    async def body():
        yield data

    try:
        form = await MultiPartParser(request.headers, body(), max_files=len(PARTS), max_fields=len(PARTS),
                                     max_part_size=len(data) + 1).parse()
    except MultiPartException as e:
        raise BadRequest(f"malformed multipart body: {e.message}") from None
    try:
        names = [k for k, _ in form.multi_items()]
        unknown = sorted(set(names) - set(PARTS))
        if unknown or len(names) != len(set(names)) or set(names) != set(PARTS):
            raise BadRequest(f"a PEFT upload has exactly the multipart parts {list(PARTS)} "
                             f"(adapter_config.json, adapter_model.safetensors), not {short(names)}")
        return {k: (await v.read()) if isinstance(v, UploadFile) else v.encode() for k, v in form.items()}
    finally:
        await form.close()
