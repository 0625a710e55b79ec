"""Round storage: everything a round produces, on disk, before anything else uses it.

    <root>/r0001/plan.json
    <root>/r0001/start.twt                  seeded initial model (first round only)
    <root>/r0001/updates/<site>.twt         validated updates, as received
    <root>/r0001/rejected/<site>.twt        updates that failed validation, kept for forensics
    <root>/r0001/candidate.twt              the aggregated model
    <root>/r0001/server_state.twt           server optimiser moments (FedAdam & co.), if any
    <root>/r0001/evaluation.json
    <root>/r0001/secure_sum.twt             under secure aggregation: the unmasked sum
    <root>/latest.json                      the latest candidate that passed every gate
    <root>/privacy_ledger.json              epsilon spent, per privacy scope and campaign

Writes are atomic (temp file + rename), so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from twin_core.server_optimizers import ServerState, state_as_weights, state_from_weights
from twin_core.weights import Manifest, StoredWeights, Weights, load_weights, save_weights


def _write_json(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


class RoundStore(dg.ConfigurableResource):
    root: str

    def round_dir(self, round_key: str) -> Path:
        return Path(self.root) / round_key

    def write_json(self, round_key: str, name: str, doc: object) -> Path:
        path = self.round_dir(round_key) / name
        _write_json(path, doc)
        return path

    def read_json(self, round_key: str, name: str) -> dict:
        return json.loads((self.round_dir(round_key) / name).read_text())

    def save_weights(
        self, round_key: str, name: str, weights: Weights, meta: dict
    ) -> tuple[Path, Manifest]:
        path = self.round_dir(round_key) / name
        return path, save_weights(path, weights, meta)

    def ledger(self):
        """The federation's privacy ledger (twin_core.privacy), empty before the first DP round."""
        from twin_core.privacy import PrivacyLedger

        return PrivacyLedger.load(self.ledger_path, missing_ok=True)

    @property
    def ledger_path(self) -> Path:
        return Path(self.root) / "privacy_ledger.json"

    def save_ledger(self, ledger) -> None:
        Path(self.root).mkdir(parents=True, exist_ok=True)
        ledger.save(self.ledger_path)

    def save_update(self, round_key: str, site_id: str, weights: Weights, meta: dict) -> Path:
        return self.save_weights(round_key, f"updates/{site_id}.twt", weights, meta)[0]

    def save_rejected(self, round_key: str, site_id: str, weights: Weights, reason: str) -> Path:
        return self.save_weights(round_key, f"rejected/{site_id}.twt", weights, {"reason": reason})[
            0
        ]

    def reject_update(self, round_key: str, site_id: str, reason: str) -> Path:
        """Move a persisted update to rejected/ (screened out after the fact), keeping it."""
        stored = load_weights(self.round_dir(round_key) / "updates" / f"{site_id}.twt")
        path = self.save_rejected(round_key, site_id, stored.weights, reason)  # not re-hashed
        (self.round_dir(round_key) / "updates" / f"{site_id}.twt").unlink()
        return path

    def clear_updates(self, round_key: str) -> None:
        """Forget the updates of an earlier attempt at this round (it is being re-run)."""
        for sub in ("updates", "rejected"):
            folder = self.round_dir(round_key) / sub
            for path in folder.glob("*.twt") if folder.exists() else ():
                path.unlink()

    @staticmethod
    def load(path: str | Path, check_as_read: bool = False) -> StoredWeights:
        """The weights in `path`, checked against the file's checksums; with `check_as_read`,
        checked page by page as `WeightedMean` folds them (twin_core.weights.load_weights)."""
        return load_weights(Path(path), check_as_read=check_as_read)

    def server_state(self, round_key: str | None, optimizer: str) -> ServerState | None:
        """The server optimiser state saved with `round_key`'s candidate (same optimiser only)."""
        path = self.round_dir(round_key) / "server_state.twt" if round_key else None
        if path is None or not path.exists():
            return None
        stored = load_weights(path)
        if stored.meta.get("optimizer") != optimizer:
            return None
        return state_from_weights(stored.weights, stored.meta)

    def save_server_state(self, round_key: str, optimizer: str, state: ServerState) -> Path:
        tensors, meta = state_as_weights(state)
        return self.save_weights(
            round_key, "server_state.twt", tensors, {**meta, "optimizer": optimizer}
        )[0]

    def participation(self, *, before: str, last: int) -> dict[str, int]:
        """How often each site was chosen in the `last` rounds planned before `before`."""
        root = Path(self.root)
        keys = (
            sorted(p.name for p in root.iterdir() if (p / "plan.json").exists())
            if root.exists()
            else []
        )
        counts: dict[str, int] = {}
        for key in [k for k in keys if k < before][-last:]:
            for site in self.read_json(key, "plan.json")["selection"]["chosen"]:
                counts[site] = counts.get(site, 0) + 1
        return counts

    def latest_passed(self) -> dict | None:
        """The pointer to the latest candidate that passed its gates, or None."""
        path = Path(self.root) / "latest.json"
        return json.loads(path.read_text()) if path.exists() else None

    def mark_passed(
        self, round_key: str, candidate_path: str, sha256: str, schema_fingerprint: str
    ) -> None:
        _write_json(
            Path(self.root) / "latest.json",
            {
                "round": round_key,
                "path": candidate_path,
                "sha256": sha256,
                "schema_fingerprint": schema_fingerprint,
            },
        )
