"""The training loop: deterministic, resumable, tracked.

One `Trainer` owns a run directory ``<runs_dir>/<run_name>/``. Batches depend only on
(seed, step), initial weights only on the seed, so runs with the same seed are paired across
precisions and formats, and a resumed run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.loader import TokenBatches
from ..errors import UserError
from ..io import write_yaml
from ..model import GPT, GPTConfig
from ..model.surgery import LayerAssignment, quantize_model
from ..optim import build_optimizer, set_learning_rates, state_bits
from ..provenance import code_version
from .checkpoint import capture_rng, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
from .config import CONFIG_FILE_NAME, TrainConfig
from .monitors import Monitor, QuantStatsMonitor, RankMonitor, ShadowMonitor, StepContext, Thresholds, UpdateMonitor
from . import distributed
from .clipping import GradientClipper
from .collapse import collapse_analysis
from .flops import utilisation
from .shift import FormatShifter
from .layer_summary import layer_summary
from .signals import StopRequest
from .threads import ThreadGovernor, thread_dependence
from .setup import Event, compiled, find_data, learning_rate, resolve_device, run_directory
from .tracking import RunTracker, read_metrics


#: Every name the trainer itself logs in metrics.jsonl (the monitors' are in their own METRICS).
METRICS: dict[str, str] = {
    "step": "optimizer steps done (0: the evaluation before training)",
    "loss": "training loss of the step (mean over its micro-batches)",
    "val_loss": "validation loss on the fixed validation batches (evaluation steps)",
    "lr": "learning rate of the step (absolute, for parameters without a format)",
    "grad/norm": "L2 norm of all gradients before clipping",
    "tokens_per_s": "training throughput since the previous record",
    "tokens": "training tokens so far",
    "threads": "CPU threads of the training process (fewer while it gets fewer CPUs: training/threads.py)",
    "grad/clip_factor/<partition>": "smallest clip factor of a gradient partition since the previous record "
                                    "(1: not clipped)",
    "format_shifts": "emergency format shifts of the step: step, layer, side, old and new format, reason",
    "alerts": "names of the alerts raised by the record (thresholds, rank drops)",
}


@dataclass
class TrainResult:
    status: str  # completed | diverged | interrupted
    steps: int
    tokens: int
    wall_s: float
    final_val_loss: float | None
    best_val_loss: float | None
    nonfinite_steps: int
    run_dir: Path
    message: str = ""
    alerts: dict[str, Any] = dataclasses.field(default_factory=dict)  # threshold alerts: name -> count, steps
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per Linear: formats, storage, updates
    format_shifts: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # emergency shifts (shift.py)
    clipping: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per partition: clipped steps
    throughput: dict[str, float] | None = None  # tokens/s over the run, MFU against the measured matmul peak
    memory: dict[str, float] | None = None  # bits per weight with a format of its training state (optim.memory)


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, on_event: Event | None = None):
        self.config = config
        self.resume = resume
        self.notify: Event = on_event or (lambda kind, payload: None)
        self.run_dir = run_directory(config)
        self.dist = distributed.context()  # a process of a torchrun job, or the only one
        self.device = self.dist.device(resolve_device(config.device))
        if not self.dist.main:
            self.notify = lambda kind, payload: None  # rank 0 alone reports

    # ---- set-up -------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        exists = (self.run_dir / CONFIG_FILE_NAME).exists()
        if exists and not self.resume:
            raise UserError(f"run {self.run_dir} already exists; add --resume to continue it or choose another --run-name")
        if self.resume and not list_checkpoints(self.run_dir):
            raise UserError(f"nothing to resume in {self.run_dir}: no checkpoints")

    def _build(self):
        cfg = self.config
        self.data_dir, self.meta = find_data(cfg, self.notify)
        torch.manual_seed(cfg.seed)  # same seed, same initial weights, whatever the precision
        model_config = GPTConfig(vocab_size=int(self.meta["vocab_size"]), block_size=cfg.block_size,
                                 n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                 dropout=cfg.dropout, bias=cfg.bias)
        self.model = GPT(model_config).to(self.device)
        policy = cfg.quant_policy()
        # Surgery after the weights exist: the same seed gives the same weights in every format.
        self.layers: list[LayerAssignment] = quantize_model(self.model, policy, cfg.seed) if policy else []
        # Format-stored weights are projected onto their grid here: every arm starts from the same grid.
        self.optimizer = build_optimizer(self.model, cfg.optimizer_spec(), cfg.seed)
        self.monitors: list[Monitor] = [QuantStatsMonitor(self.model, cfg.stats_interval, cfg.dead_window),
                                        UpdateMonitor(self.model, cfg.stats_interval, self.optimizer)]
        self.monitors.append(RankMonitor(self.model, cfg.rank_interval, cfg.rank_threshold, cfg.critical_layers,
                                         cfg.critical_threshold_multiplier, window=round(cfg.rank_window * cfg.max_steps),
                                         settle=cfg.warmup))
        if cfg.use_shadow:
            self.monitors.append(ShadowMonitor(self.model, model_config, self.device, cfg.shadow_interval))
        self.clipper = GradientClipper(self.model, cfg.grad_clip, cfg.grad_clip_mode)
        self.shifter = FormatShifter(self.model, self.optimizer, cfg.shift_patience, cfg.overflow_threshold,
                                     cfg.bit_stall_threshold) if cfg.format_shift and self.layers else None
        self.thresholds = Thresholds(cfg.overflow_threshold, cfg.underflow_threshold, cfg.bit_stall_threshold,
                                     cfg.grad_cos_threshold)
        # Training on CPU: as many threads as the process really gets CPUs (a shared machine).
        self.threads = ThreadGovernor(active=cfg.adapt_threads and self.device.type == "cpu")
        self.batches = TokenBatches(self.data_dir, cfg.block_size, cfg.batch_size, cfg.seed, self.device)
        self.evaluation = compiled(self.model, cfg)
        self.ddp = None
        if self.dist.active:  # after the optimizer: format weights are on their grid, identical on every rank
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.forward = self.evaluation if self.ddp is None else compiled(self.ddp, cfg)

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- pieces of a step -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for x, y in self.batches.val_batches(self.config.eval_iters):
            with self._autocast():
                _, loss = self.evaluation(x, y)
            losses.append(float(loss))
        self.model.train()
        return sum(losses) / len(losses)

    def _micro_batches(self, step: int):
        """This process's micro-batches of the step (all of them in a single process)."""
        micros, rows = self.dist.share(self.config.grad_accum, self.config.batch_size)
        return [tuple(t[rows] for t in self.batches.train_batch(step, micro)) for micro in micros]

    def _forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Forward/backward over this process's micro-batches; returns the step's mean loss (over
        every process). Under DDP the gradients are averaged on the last micro-step only."""
        total, count = 0.0, len(batches)
        for index, (x, y) in enumerate(batches):
            local = self.ddp.no_sync() if self.ddp is not None and index < count - 1 else contextlib.nullcontext()
            with local:
                with self._autocast():
                    _, loss = self.forward(x, y)
                (loss / count).backward()
            total += float(loss.detach()) / count
        return self.dist.mean(total, self.device)

    def _step(self, step: int) -> tuple[float, float, bool, dict[str, float]]:
        """One optimizer step (1-based ``step`` once done): (loss, grad norm, applied, monitor metrics)."""
        due = [monitor for monitor in self.monitors if monitor.due(step + 1)]
        rng_state = capture_rng() if any(monitor.needs_rng for monitor in due) else None
        batches = self._micro_batches(step)
        ctx = StepContext(step + 1, batches, len(batches), rng_state, self.dist.average)
        metrics: dict[str, float] = {}
        for monitor in due:
            monitor.before_forward(ctx)
        loss = self._forward_backward(ctx.batches)
        for monitor in due:
            metrics |= monitor.after_backward(ctx)
        grad_norm, factors = self.clipper()
        for name, factor in factors.items():  # the smallest factor since the last record
            self.clip_window[name] = min(factor, self.clip_window.get(name, 1.0))
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        if applied:
            for monitor in due:
                monitor.before_update(ctx)
            self.optimizer.step()
            for monitor in due:
                metrics |= monitor.after_update(ctx)
        return loss, grad_norm, applied, metrics

    def _state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": capture_rng(),
            "trainer": dict(self.counters),
            "monitors": {monitor.name: monitor.state_dict() for monitor in self.monitors},
            "clipper": self.clipper.state_dict(),
            "shifter": self.shifter.state_dict() if self.shifter else None,
            "config": self.config.to_dict(),
        }

    def _save(self, step: int) -> None:
        if not self.dist.main:
            return
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self.notify("warning", {"message": f"step {step}: weights are not finite; checkpoint not written"})
            return
        path = save_checkpoint(self.run_dir, step, self._state(step), self.config.keep_checkpoints)
        self.notify("checkpoint", {"step": step, "path": str(path)})

    def _restore(self) -> int:
        state = load_checkpoint(list_checkpoints(self.run_dir)[-1], map_location=self.device)
        if self.shifter and state.get("shifter"):  # the layers' formats first: the weights are on their grids
            self.shifter.load_state_dict(state["shifter"])
            self.clipper.regroup(self.model)
        self.model.load_state_dict(state["model"])
        peaks = [group["base_lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, peak in zip(self.optimizer.param_groups, peaks):
            group.setdefault("base_lr", peak)  # a checkpoint from before per-group peaks
        restore_rng(state["rng"])
        if "clipper" in state:
            self.clipper.load_state_dict(state["clipper"])
        self.counters.update(state["trainer"])
        for monitor in self.monitors:
            if monitor.name in state.get("monitors", {}):
                monitor.load_state_dict(state["monitors"][monitor.name])
        return int(state["step"])

    def _check_threads(self, step: int) -> None:
        """Fix the thread count when another count would change this run's arithmetic (one step of
        its own shapes on a copy of the model, the same random draws at every count)."""
        if not self.threads.active or self.threads.full <= 1:
            return
        batches, rng = self._micro_batches(step), capture_rng()

        def one_step() -> list[torch.Tensor]:
            restore_rng(rng)
            probe = copy.deepcopy(self.model)  # its scales, amax histories and generators as they are now
            probe.zero_grad(set_to_none=True)
            losses = []
            for x, y in batches:
                with self._autocast():
                    _, loss = probe(x, y)
                (loss / len(batches)).backward()
                losses.append(loss.detach())
            grads = [p.grad for p in probe.parameters() if p.grad is not None]
            return [*losses, *grads, torch.nn.utils.get_total_norm(grads, 2.0)]

        dependent = thread_dependence(one_step, self.threads.full)
        restore_rng(rng)
        if dependent is not None:
            reason = (f"one step at {dependent} threads differs from {self.threads.full} threads in its last bits, "
                      f"so the count stays at {self.threads.full}: the run never depends on the machine's load")
            self.threads.fix(reason)
            self.notify("warning", {"message": f"threads fixed: {reason}"})

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        joined = distributed.start(self.dist, self.device)
        try:
            result = self._run()
        except RuntimeError as error:
            if not (self.dist.active and distributed.peer_lost(error)):
                raise
            # No goodbye to a process group that lost a member: it could wait for it forever.
            last = list_checkpoints(self.run_dir)
            where = f"its last checkpoint ({last[-1].name})" if last else "the start (no checkpoint yet)"
            raise UserError(f"rank {self.dist.rank}: another process of this run stopped ({str(error)[:160]}); "
                            f"run the same torchrun command with --resume to continue from {where}") from None
        self.dist.barrier()  # no process leaves the group while another still uses it (gloo aborts then)
        distributed.stop(joined)
        return result

    def _run(self) -> TrainResult:
        cfg = self.config
        self._check_run_dir()
        self.dist.barrier()  # every process has checked before rank 0 writes
        self._build()
        self.counters = {"tokens": 0, "nonfinite_steps": 0, "consecutive_nonfinite": 0, "wall_s": 0.0,
                         "best_val_loss": None, "final_val_loss": None, "alerts": {}, "alerting": []}
        self.clip_window: dict[str, float] = {}
        start = self._restore() if self.resume else 0
        self._check_threads(start)
        main = self.dist.main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_yaml(self.run_dir / CONFIG_FILE_NAME, cfg.to_dict())
        tracker = RunTracker(self.run_dir, cfg.to_dict(), cfg.wandb, cfg.wandb_project,
                             resume_step=start if self.resume else None) if main else None
        self.notify("start", {"run_dir": str(self.run_dir), "data": str(self.data_dir), "device": str(self.device),
                              "params": self.model.num_parameters(), "start_step": start,
                              "max_steps": cfg.max_steps, "vocab_size": int(self.meta["vocab_size"]),
                              "layers": self.layers, "label": cfg.label})
        status, message, step = "completed", "", start
        began = time.perf_counter() - self.counters["wall_s"]
        forced = False
        with StopRequest() as stop:  # SIGINT/SIGTERM: stop at the next step boundary
            try:
                if start == 0 and main:
                    self._record(tracker, 0, {"val_loss": self.evaluate(), "lr": learning_rate(0, cfg)})
                window_start, window_tokens = time.perf_counter(), 0
                while step < cfg.max_steps:
                    lr = learning_rate(step, cfg)
                    set_learning_rates(self.optimizer, lr / cfg.lr)  # the schedule, peak 1
                    with self.threads.timing():
                        loss, grad_norm, applied, monitored = self._step(step)
                    step += 1
                    for event in self.threads.take_events():
                        self.notify("warning", {"message": f"step {step}: {event['from']} -> {event['to']} CPU "
                                                           f"threads ({event['reason']})"})
                    if applied:
                        self.counters["consecutive_nonfinite"] = 0
                    else:
                        self.counters["nonfinite_steps"] += 1
                        self.counters["consecutive_nonfinite"] += 1
                        self.notify("warning", {"message": f"step {step}: non-finite loss or gradient, step skipped"})
                    shifts = self._shifts(step, monitored, applied)
                    for event in shifts:
                        self.notify("format_shift", event)
                    if any(e["shifted"] and "gradient" in e["to"] for e in shifts):
                        self.clipper.regroup(self.model)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.counters["tokens"] += cfg.tokens_per_step
                    window_tokens += cfg.tokens_per_step
                    if self.counters["consecutive_nonfinite"] >= cfg.nan_patience:
                        status = "diverged"
                        message = f"{cfg.nan_patience} consecutive non-finite steps at step {step}"
                        break
                    is_eval = step % cfg.eval_interval == 0 or step == cfg.max_steps
                    if main and (step % cfg.log_interval == 0 or is_eval or monitored or shifts):
                        elapsed = time.perf_counter() - window_start
                        record = {"loss": loss, "lr": lr, "grad/norm": grad_norm,
                                  "tokens_per_s": window_tokens / elapsed if elapsed > 0 else 0.0,
                                  "tokens": self.counters["tokens"], "threads": torch.get_num_threads(), **monitored,
                                  **{f"grad/clip_factor/{name}": f for name, f in self.clip_window.items()}}
                        self.clip_window = {}
                        if shifts:
                            record["format_shifts"] = shifts
                        if is_eval:
                            record["val_loss"] = self.evaluate()
                        self._record(tracker, step, record)
                        window_start, window_tokens = time.perf_counter(), 0
                    if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps:
                        self.counters["wall_s"] = time.perf_counter() - began
                        self._save(step)
                    if self.dist.any(stop.reason is not None, self.device) and step < cfg.max_steps:
                        status, message = "interrupted", f"stopped by {stop.reason or 'another process'} at step {step}"
                        break
            except KeyboardInterrupt:  # forced (a second Ctrl-C): maybe mid-step, so no checkpoint of it
                status, message = "interrupted", f"interrupted at step {step}; resumes from the last checkpoint"
                forced = True
        self.counters["wall_s"] = time.perf_counter() - began
        if status != "completed" and not forced:  # a completed run saved its last step in the loop
            self._save(step)
        result = TrainResult(status=status, steps=step, tokens=self.counters["tokens"], wall_s=self.counters["wall_s"],
                             final_val_loss=self.counters["final_val_loss"],
                             best_val_loss=self.counters["best_val_loss"],
                             nonfinite_steps=self.counters["nonfinite_steps"], run_dir=self.run_dir, message=message,
                             alerts=self.counters["alerts"], layers=self._layer_summary(),
                             format_shifts=self.shifter.events if self.shifter else [],
                             clipping=self.clipper.summary(),
                             throughput=self._throughput(self.counters["tokens"], self.counters["wall_s"]),
                             memory=self._memory())
        if tracker is not None:
            tracker.write_summary({k: (str(v) if isinstance(v, Path) else v)
                                   for k, v in dataclasses.asdict(result).items()}
                                  | {"params": self.model.num_parameters(), "precision": cfg.precision,
                                     "seed": cfg.seed, "device": str(self.device), "label": cfg.label,
                                     "arm": cfg.arm, "optimizer": cfg.optimizer, "processes": self.dist.world,
                                     "code": code_version(),
                                     "data": {"dir": str(self.data_dir), "name": self.meta.get("name"),
                                              "tokenizer": self.meta.get("tokenizer"),
                                              "train_tokens": self.meta.get("splits", {}).get("train", {}).get("tokens")},
                                     "collapse": collapse_analysis(read_metrics(self.run_dir), status, step)})
            tracker.close()
        return result

    def _throughput(self, tokens: int, wall_s: float) -> dict[str, float] | None:
        """Tokens per second over the whole run (evaluation and monitoring included: what the user
        waits for) and the model FLOPs utilisation against this device's measured matmul peak."""
        if not tokens or wall_s <= 0 or not self.dist.main:
            return None
        rate = tokens / wall_s
        # the GEMMs' dtype: quantized layers run theirs in gemm_dtype (bf16 by default) even under fp32
        low = self.layers and any(a.config is not None for a in self.layers) and self.config.gemm_dtype == "bf16"
        dtype = torch.bfloat16 if self.config.precision == "bf16" or low else torch.float32
        return {"tokens_per_s": rate, **utilisation(self.model.config, self.model.num_parameters(), rate,
                                                   self.device, dtype, self.dist.world, self.threads.full),
                **self.threads.summary()}

    def _memory(self) -> dict[str, float] | None:
        """Bits per parameter of the persistent training state of the weights with a format (stored,
        masters, moments, compensation, other: optim.memory), measured at the end of the run, once the
        optimizer holds its state (a resumed run: the checkpoint's); None without weight formats."""
        bits = state_bits(self.model, self.optimizer)
        return bits.to_dict() if bits is not None else None

    def _shifts(self, step: int, monitored: dict[str, float], applied: bool) -> list[dict[str, Any]]:
        """The emergency shifts of this step: decided on rank 0 (its statistics) and applied on every
        process, so that the replicas keep the same formats."""
        if self.shifter is None:
            return []
        if not self.dist.active:
            return self.shifter.observe(step, monitored, applied)
        decided = [self.shifter.observe(step, monitored, applied) if self.dist.main else None]
        torch.distributed.broadcast_object_list(decided, src=0)
        if not self.dist.main:
            for event in decided[0]:
                self.shifter.apply(event, project=True)
        return decided[0]

    def _record(self, tracker: RunTracker, step: int, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            # final: the last evaluation, whatever its value (a non-finite one is reported as such);
            # best: the lowest finite one
            self.counters["final_val_loss"] = record["val_loss"]
            if math.isfinite(record["val_loss"]):
                best = self.counters["best_val_loss"]
                self.counters["best_val_loss"] = record["val_loss"] if best is None else min(best, record["val_loss"])
        record = {"step": step, **record}
        self._check_thresholds(step, record)
        tracker.log(record)
        self.notify("log", record)

    def _check_thresholds(self, step: int, record: dict[str, Any]) -> None:
        """Warn when an alert is raised (once per excursion) and count it: the thresholds on
        headline metrics and the monitors' own alerts (rank drops)."""
        judged = self.thresholds.alerts(record)
        for monitor in self.monitors:
            judged |= monitor.alerts(record)
        crossed = {name: alert for name, alert in judged.items() if alert is not None}
        alerts, alerting = self.counters["alerts"], self.counters["alerting"]
        for name, alert in crossed.items():
            seen = alerts.setdefault(name, {"count": 0, "first_step": step, "last_step": step,
                                            "message": alert["message"], "critical": alert["critical"]})
            seen["count"] += 1
            seen["last_step"] = step
            if name not in alerting:
                alerting.append(name)
                self.notify("warning", {"message": f"step {step}: {alert['message']}", "critical": alert["critical"],
                                        "alert": name})
        if crossed:
            record["alerts"] = sorted(crossed)
        # An alert clears once its metric is measured again and is back within bounds.
        self.counters["alerting"] = [n for n in alerting if n in crossed or n not in judged]

    def _layer_summary(self) -> dict[str, dict[str, Any]]:
        compensation = self.config.compensation
        return layer_summary(self.layers, self.model, self.monitors, self.shifter, self.config.optimizer,
                             None if compensation == "none" else f"{compensation} {self.config.compensation_dtype}")
