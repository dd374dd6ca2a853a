"""The checkpoint step, and the resume that reads what it wrote: each stage's files, then ``stage.json``
with their SHA-256 (its presence marks the stage complete)."""

from __future__ import annotations

from ..callbacks import StageContext
from ..evaluation.results import stage_result_from_json, stage_result_to_json
from ..losses.state import load_training_state, training_state


class CheckpointStep:
    """Writes F_i, the drift state, F_p's metric-loss state (when it has any) and the gallery state, then the
    stage's record (results, per-epoch losses, seconds per phase); appends them to the run's results."""

    name = "checkpoint"

    def run(self, learner, ctx: StageContext) -> None:
        stage = ctx.stage
        files = {"model.pt": ctx.student.state_dict(), "drift.pt": learner.compensator.state_dict()}
        loss_state = training_state(learner.metric_loss)
        if loss_state:  # F_p's metric loss goes on training with it in the next stage
            files["metric_loss.pt"] = loss_state
        if learner.gallery is not None:
            files["gallery.pt"] = learner.gallery.stage_state(stage)
        phases = {k: ctx.seconds[k] for k in ("train", "drift", "eval") if k in ctx.seconds}
        log = {
            "stage": stage,
            "epoch_losses": ctx.epoch_losses,
            "seconds": sum(phases.values()),
            "phase_seconds": phases,
        }
        learner.directory.save_stage(stage, files, {"results": stage_result_to_json(ctx.results), "log": log})
        learner.stage_results.append(ctx.results)
        learner.stage_logs.append(log)


def resume(learner) -> int:
    """Read the completed stages of the run directory (already accepted for this run's identity) into
    ``learner`` and return the first stage still to train."""
    directory = learner.directory
    done = directory.completed_stages(len(learner.train_stages))
    for doc in done:
        try:
            learner.stage_results.append(stage_result_from_json(doc["results"]))
        except (KeyError, TypeError, ValueError) as e:
            path = directory.stage_dir(len(learner.stage_results)) / "stage.json"
            raise ValueError(
                f"{path} is damaged ({type(e).__name__}: {e}); delete its stage directory to retrain it"
            ) from e
        learner.stage_logs.append(doc["log"])
    stage = len(done)
    if stage > 0:
        learner.compensator.load_state_dict(directory.load_stage_file(stage - 1, "drift.pt"))
        if training_state(learner.metric_loss):
            load_training_state(learner.metric_loss, directory.load_stage_file(stage - 1, "metric_loss.pt"))
        if learner.gallery is not None:
            learner.gallery.load_stage_states(
                [directory.load_stage_file(b, "gallery.pt") for b in range(stage)]
            )
        if not learner.quiet:
            print(f"[{learner.config.method}] resuming {learner.run_dir} at stage {stage}", flush=True)
    return stage
