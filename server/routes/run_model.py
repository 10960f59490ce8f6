"""`GET /runs/{run_id}/model`: a finished run's model (its `final/` directory) as a streamed `.tar.gz`.

The archive is written as it is sent (tar headers and file bytes in 1 MiB chunks through a streaming gzip at
level 1, since weights barely compress), so the server holds one chunk at a time whatever the model's size; no
temporary copy is made. Only regular files under `final/` are included, by their path relative to it: symbolic
links and anything else are skipped, never followed. The run must be the caller's and COMPLETED with a model in
`final/`: a full one (`config.json`) or a LoRA adapter (`adapter_config.json`, `merge_lora: false`). Otherwise there
is no model to download: 404, with the reason when the run is the caller's (another user's run is a plain 404, as
everywhere). Not covered: resuming a partial download (no Range support).
"""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.auth import Principal
from server.errors import ApiError
from server.openapi import string
from server.routes import api
from server.routes.run_outputs import owned_run, run_dir

CHUNK = 1024 * 1024
BLOCK = tarfile.BLOCKSIZE


def model_files(final: Path) -> list[tuple[Path, str]]:
    """(path, name in the archive) of every regular file under `final`, sorted; links are not followed."""
    out = []
    for root, dirs, names in os.walk(final, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                out.append((path, f"final/{path.relative_to(final).as_posix()}"))
    return out


def tar_gz(files: list[tuple[Path, str]]) -> Iterator[bytes]:
    """A gzip-compressed ustar/pax archive of `files`, yielded in pieces."""
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    for path, name in files:
        try:
            fh = open(path, "rb")
        except OSError:
            continue
        with fh:
            st = os.fstat(fh.fileno())
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o644
            yield gz.compress(info.tobuf(format=tarfile.PAX_FORMAT))
            left = st.st_size
            while left > 0:  # exactly the size in the header, even if the file changes under us
                piece = fh.read(min(CHUNK, left)) or b"\0" * min(CHUNK, left)
                left -= len(piece)
                yield gz.compress(piece)
            if st.st_size % BLOCK:
                yield gz.compress(b"\0" * (BLOCK - st.st_size % BLOCK))
    yield gz.compress(b"\0" * (2 * BLOCK))  # end of archive
    yield gz.flush()


async def download_model(request: Request, p: Principal) -> Response:
    row = owned_run(request, p)
    directory = run_dir(request, row)
    if row["status"] != "COMPLETED":
        raise ApiError(404, f"Run {row['id']} has no model yet: it is {row['status']}, and only a COMPLETED run has "
                            "one to download", details={"run_id": f"run {row['id']} is {row['status']}"})
    if not directory.has_model:
        raise ApiError(404, f"Run {row['id']} has no final model (final/ holds neither config.json nor "
                            "adapter_config.json)", details={"run_id": "no model in final/"})
    files = model_files(directory.final)
    return StreamingResponse(tar_gz(files), media_type="application/gzip", headers={
        "Content-Disposition": f'attachment; filename="run-{row["id"]}-model.tar.gz"', "Cache-Control": "no-store"})


ROUTES = [
    api("/runs/{run_id}/model", download_model, ["GET"], "read", summary="Download the run's final model (.tar.gz)",
        media={"application/gzip": string(format="binary", description="final/ as a gzip-compressed tar")},
        errors=(404,)),
]
