"""`--model`: a local .gguf path, or `hf:OWNER/REPO/FILE.gguf` fetched into the
Hugging Face cache with huggingface_hub."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moestream.kernels.errors import MoestreamError

HF_PREFIX = "hf:"


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user passed

    @property
    def is_hub(self) -> bool:
        return self.spec.startswith(HF_PREFIX)

    @property
    def default_name(self) -> str:
        """The served model name when none is given: the file name without .gguf."""
        return Path(self.spec.removeprefix(HF_PREFIX)).stem

    def check(self) -> None:
        """Fail fast, before binding the port, on what can be checked without a download."""
        if self.is_hub:
            self._hub_parts()
        elif not Path(self.spec).is_file():
            raise MoestreamError(f"{self.spec}: no such file; pass the path of a .gguf model "
                                 f"or {HF_PREFIX}OWNER/REPO/FILE.gguf")

    def resolve(self) -> Path:
        """The local path of the model file, downloading it first for `hf:`."""
        if not self.is_hub:
            return Path(self.spec)
        return self._download(*self._hub_parts())

    def _hub_parts(self) -> tuple[str, str]:
        """(repo id, file path in the repo); anything that could name a path outside the
        repo (absolute, "..", ".", empty parts, backslashes) is refused."""
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        usage = f"write a Hugging Face file as {HF_PREFIX}OWNER/REPO/FILE.gguf (FILE may include folders)"
        parts = self.spec.removeprefix(HF_PREFIX).split("/")
        if len(parts) < 3 or not all(parts):
            raise MoestreamError(f"{self.spec!r}: {usage}")
        if any(part in (".", "..") for part in parts) or "\\" in self.spec:
            raise MoestreamError(f"{self.spec!r}: '.', '..' and backslashes are not allowed in a "
                                 f"Hugging Face reference; {usage}")
        repo_id = "/".join(parts[:2])
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise MoestreamError(f"{self.spec!r}: {repo_id!r} is not a Hugging Face repository id "
                                 f"({str(exc).rstrip('.')}); {usage}") from None
        return repo_id, "/".join(parts[2:])

    def _download(self, repo_id: str, filename: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError)

        try:
            return Path(hf_hub_download(repo_id, filename))
        except LocalEntryNotFoundError:
            raise MoestreamError(
                f"cannot download {filename} from {repo_id}: the Hugging Face Hub is unreachable "
                "(offline, or HF_HUB_OFFLINE is set) and the file is not in the local cache; "
                "connect to the network or pass a local .gguf path") from None
        except GatedRepoError:
            raise MoestreamError(f"{repo_id} is gated: accept its terms on huggingface.co and "
                                 "log in (huggingface-cli login or HF_TOKEN)") from None
        except RepositoryNotFoundError:
            raise MoestreamError(f"no Hugging Face repository {repo_id!r} (or it is private: "
                                 "log in with HF_TOKEN)") from None
        except EntryNotFoundError:
            raise MoestreamError(f"{repo_id} has no file {filename!r}; check the name on "
                                 "huggingface.co") from None
        except HfHubHTTPError as exc:
            raise MoestreamError(f"downloading {filename} from {repo_id} failed: {exc}") from None
