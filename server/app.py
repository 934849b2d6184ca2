"""The Flower ServerApp: read the run config, call ``server.federation.federate``."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common import keys
from common.config import RunConfig, load_config
from common.runfiles import SERVER_ERROR_FILE
from server.federation import federate


def run_config_flag(value: object, key: str) -> bool:
    """A boolean run config value: TOML gives a bool, ``-c key=true`` may give the string."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"run config {key}: must be true or false, got {value!r}")
    return text == "true"


def make_app(
    cfg: RunConfig | None = None,
    out_dir: Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    resume: bool | None = None,
) -> ServerApp:
    """Build the ServerApp; the in-process simulator passes a parsed config, stock Flower passes nothing.

    ``resume`` None takes the run config's ``resume`` key (false when absent).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or load_config(Path(str(context.run_config[keys.RUN_CONFIG_PATH])))
        out = out_dir or Path(str(context.run_config.get(keys.RUN_OUT_DIR, "runs/flwr")))
        resuming = (
            resume if resume is not None else run_config_flag(context.run_config.get(keys.RUN_RESUME, False), "resume")
        )
        # an error file of the run this one resumes would otherwise outlive the recovery
        (out / SERVER_ERROR_FILE).unlink(missing_ok=True)
        try:
            federate(grid, run_cfg, out, on_round, resume=resuming)
        except Exception:
            # Flower logs a ServerApp's exception but does not hand it to whoever started the run
            out.mkdir(parents=True, exist_ok=True)
            (out / SERVER_ERROR_FILE).write_text(traceback.format_exc())
            raise

    return app


# Entry point for stock Flower tooling (`flwr run`): the config file is named in the run config.
app = make_app()
