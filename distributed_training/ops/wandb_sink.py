"""Optional Weights & Biases logging of the events neurons already write to metrics.jsonl.

wandb is never required: peer discovery does not use it (a swarm that found its peers through
wandb runs would break for anyone without an account), and with no API key it runs offline (local
files, no network) or, with `--wandb.off`, not at all. Any wandb failure disables it with one warning;
training and validation never wait on it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

logger = logging.getLogger(__name__)

# Which metrics.jsonl events go to wandb, and which of their fields.
_EVENT_FIELDS = {
    "epoch": ("epoch", "loss", "samples_per_s", "peers", "group_size", "samples_trained"),
    "step": ("loss", "samples_per_s", "epoch", "peers"),
}


class WandbSink:
    def __init__(self, run: Any):
        self._run = run

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if self._run is None:
            return
        try:
            if event == "round":
                data = {"round": fields["round"], "swarm_epoch": fields["swarm_epoch"]}
                for row in fields["rows"]:
                    data[f"score/{row['uid']}"] = row["score"]
                    data[f"moving_average/{row['uid']}"] = row["moving_average"]
                self._run.log(data)
            elif event == "weights":
                self._run.log({f"weight/{uid}": w for uid, w in fields["weights"].items()})
            elif event in _EVENT_FIELDS:
                self._run.log({f"{event}/{k}": fields[k] for k in _EVENT_FIELDS[event] if fields.get(k) is not None})
        except Exception as exc:  # a dashboard must never stop a neuron
            logger.warning("wandb logging failed, turning it off: %s", exc)
            self._run = None

    def close(self) -> None:
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as exc:
                logger.warning("wandb finish failed: %s", exc)


def open_wandb(config: SimpleNamespace, role: str, hotkey: str, run_dir: Path) -> Optional[WandbSink]:
    """A sink, or None when wandb is off. Mode: online with WANDB_API_KEY, else offline."""
    settings = config.wandb
    if settings.off:
        return None
    mode = settings.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    try:
        import wandb

        run = wandb.init(
            project=settings.project, entity=settings.entity, mode=mode, dir=str(run_dir),
            name=f"{role}-{hotkey[:8]}-{config.neuron.run_id}", group=config.neuron.run_id,
            config={"role": role, "hotkey": hotkey, "run_id": config.neuron.run_id, "preset": config.model.preset},
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
    except Exception as exc:
        logger.warning("wandb unavailable (%s); continuing without it", str(exc).splitlines()[0] if str(exc) else exc)
        return None
    logger.info("wandb logging in %s mode", mode)
    return WandbSink(run)
