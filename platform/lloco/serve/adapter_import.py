"""The edge's import of adapters trained elsewhere (ImportAdapter).

PEFT files arrive inline or from a folder in the tenant's uploads folder; they are checked against what the
engine serves (``lloco.model.lora.check_peft_files`` on the engine's ``LoraFit``: the same check the engine
applies when it loads a version) before anything is stored, then published through the registry as the
adapter's next version, as a finetune publishes. Only the two PEFT files are stored, byte for byte.

Imports of one adapter through one replica run one at a time (the registry takes one publisher per adapter
at a time); imports of one adapter sent to several replicas at once are not serialised.

Sizes are bounded before parsing: the config by ``MAX_CONFIG_BYTES``, the weights by the largest file an
adapter that fits can be (``LoraFit.max_weights_bytes``), so no setting is needed and nothing larger is
read from the store.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable

from lloco.api import lloco_pb2
from lloco.errors import InvalidArgument, NotFound
from lloco.model.lora import CONFIG_FILE, WEIGHTS_FILE, LoraFit, check_peft_files
from lloco.registry import AdapterVersion, Registry
from lloco.serve.documents import EdgeDocuments
from lloco.serve.edge import TenantWork
from lloco.storage import ObjectStore, keys

MAX_CONFIG_BYTES = 2**20
PICKLED_WEIGHTS = "adapter_model.bin"  # what peft writes with safe_serialization=False


class AdapterImports:
    """Checks and publishes the adapters tenants bring, through ``work`` (store calls) and ``documents``
    (the uploads folder); ``lora_fit`` gives what the engine serves (asked once)."""

    def __init__(
        self,
        store: ObjectStore,
        work: TenantWork,
        documents: EdgeDocuments,
        lora_fit: Callable[[], Awaitable[LoraFit]],
    ) -> None:
        self._store, self._work, self._documents, self._lora_fit = store, work, documents, lora_fit
        self._publishing: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    async def publish(
        self, registry: Registry, adapter: str, request: lloco_pb2.ImportAdapterRequest
    ) -> AdapterVersion:
        """The request's files, checked, as the next (current) version of ``adapter``.

        Raises:
            InvalidArgument / FailedPrecondition: as ``check_peft_files``, plus no source, files over their
                size bound. PermissionDenied / NotFound: a ``source_uri`` outside the uploads folder, or
                without the files.
        """
        fit = await self._lora_fit()
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidArgument("one of files or source_uri is required")
        if source == "files":
            files, origin = self._inline(request.files, fit), "inline"
        else:
            files, origin = await self._uploaded(registry.tenant, request.source_uri, fit), request.source_uri
        checked = await asyncio.to_thread(check_peft_files, files, fit)
        train = {
            "source": "import",
            "origin": origin,
            "base_model_name_or_path": checked.base_model,
            "targets": ",".join(checked.targets),
        }
        lock = self._publishing.setdefault((registry.uid, adapter), asyncio.Lock())
        async with lock:
            return await self._work.run(registry.tenant, registry.publish_adapter, adapter, files, train)

    def _inline(self, given: lloco_pb2.PeftAdapterFiles, fit: LoraFit) -> dict[str, bytes]:
        for field, data in (("adapter_config", given.adapter_config), ("adapter_model", given.adapter_model)):
            if not data:
                raise InvalidArgument(f"files.{field} is required")
        _check_sizes(
            {CONFIG_FILE: len(given.adapter_config), WEIGHTS_FILE: len(given.adapter_model)}, fit, "files"
        )
        return {CONFIG_FILE: given.adapter_config, WEIGHTS_FILE: given.adapter_model}

    async def _uploaded(self, tenant: str, uri: str, fit: LoraFit) -> dict[str, bytes]:
        folder = self._documents.upload_key(tenant, uri, folder=True)
        files = {}
        for filename, limit in ((CONFIG_FILE, MAX_CONFIG_BYTES), (WEIGHTS_FILE, fit.max_weights_bytes)):
            try:
                files[filename] = await self._documents.read_upload(
                    tenant, folder + filename, limit, f"{filename} at source_uri"
                )
            except NotFound:
                await self._refuse_pickle(tenant, folder, filename)
                raise NotFound(f"source_uri {keys.show(uri)} has no {filename}") from None
        return files

    async def _refuse_pickle(self, tenant: str, folder: str, missing: str) -> None:
        """A folder with pickled weights instead of safetensors gets a reason, not a NotFound."""
        if missing == WEIGHTS_FILE and await self._work.run(
            tenant, self._store.exists, folder + PICKLED_WEIGHTS
        ):
            raise InvalidArgument(
                f"source_uri holds {PICKLED_WEIGHTS}, a pickle, which is never loaded: save the adapter as "
                f"{WEIGHTS_FILE} (peft's save_pretrained does by default)"
            )


def _check_sizes(sizes: dict[str, int], fit: LoraFit, where: str) -> None:
    """InvalidArgument for a file larger than any adapter the engine could serve."""
    limits = {CONFIG_FILE: MAX_CONFIG_BYTES, WEIGHTS_FILE: fit.max_weights_bytes}
    for filename, size in sizes.items():
        if size > limits[filename]:
            raise InvalidArgument(
                f"{where}: {filename} is {size} bytes; an adapter the served model takes (rank <= "
                f"{fit.max_rank} on {list(fit.targets)}) has at most {limits[filename]}"
            )
