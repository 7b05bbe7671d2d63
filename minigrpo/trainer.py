"""The GRPO training loop: `train()` reads top to bottom, one optimizer step per iteration.

Set-up (`minigrpo/startup.py`): check the inputs, load the policy, the reference and the rollout
engine, resume. Then per step, one call per phase (`minigrpo/phases.py`):

    rollouts  = collect_rollouts(...)    prompts -> G completions each -> rewards (dynamic sampling inside)
    batch     = compute_advantages(...)  group-normalized advantages, the micro-batch plan
    batch     = frozen_logprobs(...)     reference (KL) and old (clipping) log-probs, before the update
    update    = update_policy(...)       DeepSpeed backward over the micro-batches, optimizer step
    push_weights(...)                    the new weights into the rollout engine, verified
    metrics   = step_metrics(...)        over every rank

and the loop's own bookkeeping below: samples, held-out evaluation, log, checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from minigrpo import checkpoint as ckpt
from minigrpo.config import Config
from minigrpo.console import stage
from minigrpo.evaluation import eval_task_count, evaluate
from minigrpo.phases import (StepBatch, collect_rollouts, compute_advantages, frozen_logprobs, push_weights,
                             step_metrics, update_policy)
from minigrpo.plan import GiB, format_plan, gpu_bytes, model_config, plan_memory
from minigrpo.runlog import Progress, RunLog, before_after, eval_line, spike_line, spikes
from minigrpo.runtime import PhaseTimer, StopOnSignal
from minigrpo.startup import LoopState, Run, TrainerState, check_inputs, run_identity, start_run, trainer_state

__all__ = ["train", "TrainerState"]


def train(cfg: Config, rewards: list, train_dataset, eval_dataset=None, template=None, resume: bool = False) -> Path:
    """Train with GRPO; returns the output directory. `rewards`: functions or `Reward`s."""
    # ---------------------------------------------------------------- set-up
    rewards = check_inputs(cfg, rewards, train_dataset, eval_dataset, template, resume)  # before any model loads
    run, state = start_run(cfg, rewards, train_dataset, eval_dataset, template, resume)
    log = RunLog(run.out, run.main, resume_step=state.step)
    if run.main:
        cfg.save(run.out / "config.yaml")
    eval_how = f"greedy, {'with the training' if cfg.eval_stop and cfg.stop else 'without'} stop strings"
    if state.step == 0 and run.eval_set is not None and cfg.eval_before_training:  # the summary's "before"
        with stage(f"step 0: {_eval_what(run)}", run.main and eval_task_count(cfg, run.eval_set) > 0):
            before = evaluate(run.rollout, run.eval_set, run.rewards, cfg, run.info, trainer_state(cfg, 0))
        if before:  # empty with eval_num_samples 0: no row, on every rank alike
            log.log(0, before)
        if run.main and before:
            print(f"[minigrpo] step 0, before training: held-out {eval_line(before)} ({eval_how})")
    # SIGINT/SIGTERM: finish this step, checkpoint, exit. Both are undone however the loop ends (an
    # exception too): the caller's signal handlers come back, and the bar's redraws stop; and the log
    # draws its last curves (a failed run's too) and closes.
    with log, StopOnSignal() as stop, Progress(run.main, state.step, cfg.max_steps) as progress:
        # ---------------------------------------------------------------- the steps
        for step in range(state.step + 1, cfg.max_steps + 1):
            timer = PhaseTimer()
            progress.watch(timer, step)  # the bar names the phase running now, and moves while it runs
            with _out_of_memory_report(run, log, step):
                rollouts = collect_rollouts(run, step, state.data_position, timer)
                batch = compute_advantages(run, rollouts)
                batch = frozen_logprobs(run, batch, timer)
                update = update_policy(run, batch, timer)
                push_weights(run, step, update, timer)
            state = LoopState(step, rollouts.data_position, 0 if update.applied else state.nonfinite_in_a_row + 1)
            metrics = step_metrics(run, step, batch, update, timer)

            # ------------------------------------------------------------ samples, evaluation, log, checkpoint
            _write_samples(run, log, step, batch)
            metrics.update(_evaluate_if_due(run, step, progress))
            metrics.update(_flag_spikes(log, progress, step, metrics))
            log.log(step, metrics)
            interrupted = stop.requested()
            diverged = state.nonfinite_in_a_row >= cfg.max_nonfinite_steps
            last = diverged or interrupted or step == cfg.max_steps
            if run.main and (step % cfg.logging_steps == 0 or last):
                progress.update(step, metrics)
                log.curves()  # the last ones are drawn when the loop is left
            if last or (cfg.save_steps and step % cfg.save_steps == 0):
                with progress.doing("saving a checkpoint"):  # as benchmarks/first_command.py reads the bar
                    saved = _save(run, state)
            if diverged:
                raise RuntimeError(
                    f"{state.nonfinite_in_a_row} steps in a row had NaN/inf gradients and were skipped; stopping. "
                    f"The last good weights are in {saved} (lower learning_rate or max_grad_norm, check rewards)"
                )
            if interrupted:
                if run.main:
                    print(f"\n[minigrpo] interrupted: step {step} finished and saved to {saved}. "
                          f"Resume with the same command plus --resume (train(..., resume=True)).")
                break

    summary = before_after(log.history, eval_how) if run.main else None
    if summary:
        print(f"[minigrpo] {summary}")
    return run.out


def _write_samples(run: Run, log: RunLog, step: int, batch: StepBatch) -> None:
    """A few of the completions trained on, with their prompts and rewards (rank 0's, into completion_samples.txt)."""
    if not run.main:
        return
    r, G = batch.rollouts, run.cfg.num_generations
    tracked = bool(r.generated_scores.per_reward.get(run.cfg.success_reward))  # as the step's success_rate
    solved = [v == 1.0 for v in r.scores.per_reward[run.cfg.success_reward]] if tracked else [False] * len(r.batch)
    log.samples(step, [t for t in r.prompt_texts for _ in range(G)], r.batch.texts, r.scores.total.tolist(), solved,
                run.cfg.num_completion_samples)


@contextlib.contextmanager
def _out_of_memory_report(run: Run, log: RunLog, step: int):
    """A GPU out-of-memory error inside a step becomes one report: the memory plan of this run
    (minigrpo/plan.py) beside the peak measured, what to change, and where to resume. What can be saved
    is: the metrics and TensorBoard files are flushed; no checkpoint is written, since the step may have
    changed some weights and not others (the last complete checkpoint is the one to resume from)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        cfg = run.cfg
        gpu = gpu_bytes(run.info.local_rank)
        measured = (f"peak allocated {torch.cuda.max_memory_allocated() / GiB:.1f} GiB of {gpu / GiB:.1f} GiB"
                    if gpu else "no GPU here: planned for 80 GiB")
        gpu = gpu or 80 * GiB
        plan = plan_memory(cfg, run.info.world_size, gpu, model_config(cfg, run.model_path))
        log.close()
        last = ckpt.latest_checkpoint(run.out)
        raise MemoryError(
            f"out of GPU memory in step {step} ({str(e).splitlines()[0]}); {measured}. "
            f"The plan for this run:\n{format_plan(plan, cfg, run.info.world_size)}\n"
            f"to use less, try: {'; '.join(plan.advice)}. Resume from {last or 'step 0 (no checkpoint yet)'} "
            "with --resume after changing settings that do not alter the data order or schedule.") from e


def _flag_spikes(log: RunLog, progress: Progress, step: int, metrics: dict) -> dict[str, float]:
    """Loss, KL or grad norm far outside its running range (a divergence that stays finite): a console
    line now, and `spike/<metric>` (its distance in MADs) in the step's row. Rank 0 (its log holds the history)."""
    found = spikes(log.history, metrics)
    if found:
        progress.write(spike_line(step, found))
    return {f"spike/{k}": distance for k, (_, _, distance) in found.items()}


def _eval_what(run: Run) -> str:
    """What the console says while the held-out tasks are evaluated."""
    n = eval_task_count(run.cfg, run.eval_set)
    return f"evaluating {n} held-out tasks (greedy, up to {run.cfg.max_completion_length} tokens each)"


def _evaluate_if_due(run: Run, step: int, progress: Progress) -> dict[str, float]:
    """Held-out greedy evaluation at every eval_steps and at the last step (empty otherwise)."""
    cfg = run.cfg
    if run.eval_set is None or not (step == cfg.max_steps or (cfg.eval_steps and step % cfg.eval_steps == 0)):
        return {}
    with progress.doing(_eval_what(run)):  # the bar's words; benchmarks/first_command.py finds "evaluating"
        return evaluate(run.rollout, run.eval_set, run.rewards, cfg, run.info, trainer_state(cfg, step))


def _save(run: Run, state: LoopState) -> Path:
    """An atomic checkpoint of the weights, optimizer, RNG and loop state (checkpoint.py)."""
    record = {"step": state.step, "data_position": state.data_position,
              "nonfinite_skipped_steps": run.policy.optimizer.skipped, "nonfinite_in_a_row": state.nonfinite_in_a_row,
              **run_identity(run.cfg)}
    return ckpt.save(run.out, state.step, run.policy, run.tokenizer, record, run.info.rank, run.cfg.save_total_limit,
                     run.adapter, ahead=run.ahead.to_json() if run.ahead is not None else None)
