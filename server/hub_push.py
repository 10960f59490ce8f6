"""A run's push to the Hugging Face Hub (`hf_name`), as the API shows it.

The engine's side: when `runrl train` has written `final/` and `hf_name` is set, it pushes it and writes the
outcome to `hf_push.json` in the run directory (`runrl_engine.checkpoint.push_to_hub`: `repo_id`, `status`
pushed | failed | skipped, `url`, `endpoint`, `error`, `at`). The server never pushes; it reads that record:

- the worker, when training exits 0 (`settle`, before the run becomes COMPLETED), adds a history entry saying
  where the model was pushed or why it was not, and in the latter case sets the run's `error_message` (the run
  is still COMPLETED: its model is in `final/`, downloadable from `GET /runs/{id}/model`);
- the Run object (`hub_fields`) carries `hf_push` (that record; `pending` while the run is active; `skipped`
  with the reason when the run ended otherwise) and `hf_name`, the repo the model is on: the requested one while
  the run is active, afterwards only when the push succeeded (so a run is never shown as pushed when it was not).

The worker has already redacted the record with the run's secrets (as it does the logs); the engine also leaves
the token out of the error text it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runrl_engine.checkpoint import read_push_record
from server.queue import ACTIVE, RunStatus
from server.store import Store

FIELDS = ("repo_id", "status", "url", "endpoint", "error", "at")


def settle(store: Store, run_id: int, run_dir: Path) -> dict[str, Any]:
    """History for the push of a run whose training exited 0; the run's values for its COMPLETED transition."""
    record = read_push_record(run_dir)
    if record is None:  # hf_name unset (or a stand-in training command that pushes nothing)
        return {}
    if record["status"] == "pushed":
        store.runs.add_history(run_id, RunStatus.RUNNING.value,
                          f"Pushed the final model to the Hugging Face Hub: {record.get('url')}")
        return {}
    message = (f"The final model was not pushed to the Hugging Face Hub ({record.get('repo_id')} at "
               f"{record.get('endpoint')}): {record.get('error') or record['status']}. It is in the run's final/ "
               f"(GET /runs/{run_id}/model).")
    store.runs.add_history(run_id, RunStatus.RUNNING.value, message)
    return {"error_message": message}


def hub_fields(run_dir: Path, status: str, requested: str | None) -> tuple[str | None, dict[str, Any] | None]:
    """(`hf_name`, `hf_push`) of a Run object."""
    if not requested:
        return None, None
    blank = dict.fromkeys(FIELDS)
    if RunStatus(status) in ACTIVE:
        return requested, {**blank, "repo_id": requested, "status": "pending"}
    record = read_push_record(run_dir) if status == RunStatus.COMPLETED.value else None
    if record is not None:
        shown = {k: record.get(k) for k in FIELDS}
        return (shown["repo_id"] if shown["status"] == "pushed" else None), shown
    reason = ("no push result was recorded" if status == RunStatus.COMPLETED.value
              else f"the run ended {status}, before its model could be pushed")
    return None, {**blank, "repo_id": requested, "status": "skipped", "error": reason}
