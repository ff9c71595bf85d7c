"""`sftdist launch`: strategy name -> accelerate config (+ DeepSpeed JSON) -> `accelerate launch`.

Gaps filled: accelerate ships no configs, and on a machine without CUDA its configs fail silently
(MULTI_CPU starts one process, MULTI_GPU starts N separate runs, `use_cpu` turns DeepSpeed into
plain DDP); it takes its multi-node fields from per-cluster config copies; its simple launcher does
not forward preemption signals; and it reports a failed worker as exit code 1 with a traceback. Here
the machine fields come from flags, the CPU environment is set per strategy, the command is built as
a list (printed exactly by --dry-run), and the workers' own exit code becomes the launcher's.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sftdist.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from sftdist.recipe import Recipe, accumulation
from sftdist.strategies import config_paths, deepspeed_stage
from sftdist.units import gib

# Signals a torchrun agent forwards to its workers instead of killing them; SIGUSR1 is what the
# slurm script asks for before the time limit, and workers answer it by checkpointing and exiting.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_PORT = 29500
# Seconds the agent waits for workers to finish their checkpoint after a signal (torchrun: 30).
DEFAULT_SHUTDOWN_TIMEOUT = "120"


@dataclass
class Launch:
    """What `accelerate launch` will run: its arguments and the variables set on top of os.environ."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    kind: str = "single"
    note: str = ""  # what --strategy auto chose and why
    output_dir: str = ""  # the recipe's: where a stopped launch looks for the checkpoint its workers saved

    @property
    def command(self) -> list[str]:
        return ["accelerate", "launch", *self.argv]

    def render(self) -> str:
        """The command as one copy-pasteable shell line, environment first."""
        return shlex.join(["env", *(f"{k}={v}" for k, v in sorted(self.env.items())), *self.command])


def config_kind(path: Path, on_cpu: bool, ds_file: Path | None = None) -> tuple[str, int | None]:
    """('single'|'ddp'|'fsdp'|'deepspeed', ZeRO stage) read with accelerate's own config loader.

    `ds_file` is the DeepSpeed JSON the launcher passes; else the config's own, relative to the
    working directory as accelerate reads it.
    """
    from accelerate.commands.config.config_args import load_config_from_file

    # accelerate's loader assumes a mapping: invalid YAML, a list or an empty file end in its traceback.
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        where = getattr(e, "problem_mark", None)
        line = f"line {where.line + 1}: " if where is not None else ""
        why = getattr(e, "problem", None) or getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: not a readable YAML accelerate config ({line}{why})") from None
    if not isinstance(raw, dict):
        found = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise UserError(f"{path}: expected a mapping of accelerate config keys (distributed_type: ...), found {found}")
    try:
        cfg = load_config_from_file(str(path))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: not a valid accelerate config ({str(e).splitlines()[0]})") from None
    dt = getattr(cfg.distributed_type, "value", str(cfg.distributed_type))
    if dt == "NO":
        return "single", None
    if dt == "MULTI_CPU" and on_cpu:
        raise UserError(
            f"{path}: distributed_type MULTI_CPU starts a single process without mpirun; use "
            "distributed_type MULTI_GPU (sftdist sets ACCELERATE_USE_CPU=true on CPU machines) or --strategy ddp"
        )
    if dt in ("MULTI_GPU", "MULTI_CPU"):
        return "ddp", None
    if dt == "FSDP":
        version = int(cfg.fsdp_config.get("fsdp_version", 1))
        if version != 2 and on_cpu:
            raise UserError(f"{path}: FSDP version {version} crashes saving on CPU; set fsdp_config.fsdp_version: 2")
        return "fsdp", None
    if dt == "DEEPSPEED":
        ds = cfg.deepspeed_config
        if "zero_stage" in ds:
            return "deepspeed", int(ds["zero_stage"])
        file = ds_file or (Path(ds["deepspeed_config_file"]) if ds.get("deepspeed_config_file") else None)
        return "deepspeed", deepspeed_stage(file) if file is not None else None
    raise UserError(f"{path}: distributed_type {dt} is not supported by sftdist; use NO, MULTI_GPU, FSDP or DEEPSPEED")


def auto_strategy(
    recipe: Recipe, gpus: int, num_processes: int | None, num_machines: int, gpu_memory_bytes: int | None
) -> tuple[str, int, str]:
    """(strategy, processes per machine, why) for `sftdist launch --strategy auto`: the planner's pick
    for this machine (the only place sftdist probes the machine's memory).

    On GPUs: every visible GPU (or --num-processes of them), each with the smallest visible GPU's
    memory unless --gpu-memory says otherwise, and this machine's RAM for zero3-offload. Without a
    GPU: --num-processes is required, each process is planned as a device holding an equal share of
    this machine's RAM (or --gpu-memory), in fp32 as sftdist trains on CPU, and offload is never chosen
    (there is no device memory to relieve).
    """
    import psutil

    from sftdist.plan import choose_strategy

    ram = psutil.virtual_memory().total
    if gpus:
        processes = num_processes or gpus
        memory = gpu_memory_bytes or smallest_gpu_memory(gpus)
        cpu_memory: int | None = ram
        where = f"{processes} GPU(s) per machine"
    else:
        if num_processes is None:
            raise UserError("--strategy auto: no GPU is visible; pass --num-processes N (processes per machine)")
        processes = num_processes
        memory = gpu_memory_bytes or ram // processes
        cpu_memory = None
        where = f"{processes} CPU process(es) per machine, each planned with {gib(memory)} GiB of this machine's RAM"
        train = {k: v for k, v in recipe.train.items() if k not in ("bf16", "fp16")}
        model = recipe.model if recipe.model.dtype != "auto" else dataclasses.replace(recipe.model, dtype="float32")
        recipe = dataclasses.replace(recipe, model=model, train={**train, "bf16": False})
    strategy, why = choose_strategy(recipe, processes, memory, num_machines, cpu_memory)
    return strategy, processes, f"{where}: {why}"


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus() -> int:
    """GPUs this process may use. torch counts them through NVML where it can, without initializing CUDA, so
    CUDA_VISIBLE_DEVICES can still be narrowed for the processes started after the count."""
    import torch

    return torch.cuda.device_count()


def smallest_gpu_memory(gpus: int) -> int:
    """Memory of the smallest of the first `gpus` visible GPUs, read through NVML where torch can, so that the
    launching process creates no CUDA context (which would hold memory on GPU 0 for the whole run)."""
    import torch

    try:
        import pynvml

        return min(int(pynvml.nvmlDeviceGetMemoryInfo(torch.cuda._get_pynvml_handler(i)).total) for i in range(gpus))
    except Exception:  # no nvidia-ml-py, or a driver NVML cannot read: ask CUDA itself
        return min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus))


# Set by every launcher sftdist runs under (torchrun/accelerate launch, the slurm script's, deepspeed's): a process
# that has them was given its device and its share of the run, and is never re-launched or pinned.
LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class ProcessChoice:
    """What one process does on this machine before it trains: "run" as it is, "relaunch" as
    `sftdist launch --strategy auto` would (one process per GPU), or "pin" to one GPU (`env` says which)."""

    action: str
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)


def one_process_choice(gpus: int, env: Mapping[str, str], strategy: str | None) -> ProcessChoice:
    """The decision for a process that would run alone on a machine with `gpus` visible GPUs.

    Why: without a launcher, transformers trains on every visible GPU with nn.DataParallel (`n_gpu =
    device_count()`), which trl's SFTTrainer refuses. `strategy` is None for `sftdist train` (nobody chose one:
    every GPU is used, as `launch --strategy auto` would) and "single" for `launch`/`selftest --strategy single`
    (one GPU, the first visible). Under a launcher, or with at most one GPU, the process runs as it is.
    """
    if gpus <= 1 or any(k in env for k in LAUNCHER_ENV):
        return ProcessChoice("run")
    if strategy is None:
        return ProcessChoice("relaunch", f"{gpus} GPUs are visible and no launcher started this process: training "
                                         "on all of them, as `sftdist launch RECIPE --strategy auto` would")
    if strategy == "single":
        first = (env.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
        return ProcessChoice("pin", f"--strategy single runs on one GPU of the {gpus} visible: "
                                    f"CUDA_VISIBLE_DEVICES={first}", {"CUDA_VISIBLE_DEVICES": first})
    return ProcessChoice("run")


def build_launch(
    recipe: str,
    strategy: str,
    num_processes: int | None = None,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    train_flags: list[str] | tuple[str, ...] = (),
    accelerate_args: list[str] | tuple[str, ...] = (),
    gpus: int | None = None,
    gpu_memory: int | None = None,
    command: list[str] | None = None,
) -> Launch:
    """Check the flags against the recipe and the machine before anything starts.

    `overrides` are `sftdist train --set` values, `train_flags` its other flags, `accelerate_args`
    extra `accelerate launch` arguments; `gpus` is the number of visible GPUs (detected if None).
    `strategy` "auto" asks the planner (`auto_strategy`); `gpu_memory` overrides the memory per device
    it plans with. `command` is what every process runs after `python -m sftdist` (default: `train RECIPE`
    with the overrides and flags; `sftdist selftest` runs its own processes this way).
    """
    from sftdist import seqpar
    from sftdist.preflight import check_strategy
    from sftdist.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)  # a bad recipe fails here, before any process starts
    gpus = visible_gpus() if gpus is None else gpus
    on_cpu = gpus == 0
    note = ""
    if strategy == "auto":
        strategy, num_processes, why = auto_strategy(loaded, gpus, num_processes, num_machines, gpu_memory)
        note = f"--strategy auto chose {strategy}: {why}"
    acc_cfg, ds_cfg = config_paths(strategy)
    kind, stage = config_kind(acc_cfg, on_cpu, ds_cfg)

    if num_machines < 1:
        raise UserError(f"--num-machines {num_machines}: expected at least 1")
    if not 0 <= machine_rank < num_machines:
        raise UserError(f"--machine-rank {machine_rank}: expected 0 to {num_machines - 1} for --num-machines {num_machines}")
    if num_processes is None:
        if kind == "single":
            num_processes = 1
        elif on_cpu:
            raise UserError(f"--strategy {strategy}: no GPU is visible; pass --num-processes N (processes per machine)")
        else:
            num_processes = gpus
    if num_processes < 1:
        raise UserError(f"--num-processes {num_processes}: expected at least 1")
    if kind == "single" and (num_processes > 1 or num_machines > 1):
        raise UserError(
            f"--strategy {strategy} runs one process; for {num_processes} processes on {num_machines} "
            "machine(s) use --strategy ddp, fsdp2 or zero1/2/3"
        )
    if kind == "single":  # on a node with several GPUs, one of them (the trainer would take them all)
        choice = one_process_choice(gpus, os.environ, "single")
        note = "; ".join(filter(None, [note, choice.note]))
    if gpus and num_processes > gpus:
        raise UserError(f"--num-processes {num_processes}: only {gpus} GPU(s) are visible on this machine")
    if accelerate_args and not accelerate_args[0].startswith("-"):
        raise UserError(f"unexpected argument '{accelerate_args[0]}'; `accelerate launch` options go after --")
    if num_machines > 1 and not main_process_ip:
        raise UserError("--num-machines > 1 needs --main-process-ip (the address of the machine with rank 0)")
    check_strategy(loaded, kind)
    seqpar.check(loaded, kind, num_processes * num_machines, strategy)
    accumulation(loaded, num_processes * num_machines)  # global_batch_size must divide over these processes
    if not {"--no-resume", "--overwrite"} & set(train_flags):
        _check_resumable_here(loaded, num_processes * num_machines)
    argv = ["--config_file", str(acc_cfg), "--num_processes", str(num_processes * num_machines),
            "--num_machines", str(num_machines)]
    if num_machines > 1:
        argv += ["--machine_rank", str(machine_rank), "--main_process_ip", main_process_ip]
    if num_machines > 1 or main_process_port is not None:
        argv += ["--main_process_port", str(main_process_port or DEFAULT_PORT)]
    if ds_cfg is not None:
        argv += ["--deepspeed_config_file", str(ds_cfg)]
    env: dict[str, str] = dict(choice.env) if kind == "single" else {}
    if stage is not None:
        # accelerate exports the stage only from its own zero_stage field, not from a DeepSpeed file;
        # the model loader needs it to store QLoRA's 4-bit weights in a dtype ZeRO-3 can shard.
        env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = str(stage)
    threads = str(max(1, cpu_cores() // num_processes))
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun otherwise sets 1 and prints a banner saying so
        env["OMP_NUM_THREADS"] = threads
    if on_cpu:
        argv += ["--num_cpu_threads_per_process", threads]
        # On CPU the trainer must not be told it is on CPU when DeepSpeed runs: accelerate would drop DeepSpeed.
        env["ACCELERATE_USE_CPU"] = "false" if kind == "deepspeed" else "true"
    if kind != "single":
        env["PET_SIGNALS_TO_HANDLE"] = FORWARDED_SIGNALS
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT)
    train_args = [a for o in overrides for a in ("--set", o)] + list(train_flags)
    argv += [*accelerate_args, "-m", "sftdist", *(command or ["train", recipe, *train_args])]
    return Launch(argv=argv, env=env, kind=kind, note=note, output_dir=loaded.output_dir)


def _check_resumable_here(recipe: Recipe, world_size: int) -> None:
    """What the newest checkpoint of output_dir allows at this number of processes, refused before any process
    starts rather than in each of them (resume.check_world_size)."""
    from sftdist import checkpoint, resume

    ckpts = checkpoint.complete_checkpoints(Path(recipe.output_dir))
    if ckpts and resume.marker_problem(ckpts[-1]) is None:
        resume.check_world_size(ckpts[-1], resume.recorded(ckpts[-1]), world_size)


def _forward_to_children(signum: int, frame: object) -> None:
    """Pass a preemption signal on to the training process (accelerate's simple launcher does not);
    with no training process yet, take the signal's default action (stop)."""
    import psutil

    children = psutil.Process().children()
    if not children:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    for child in children:
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def _saved_since(output_dir: str, start: float) -> str | None:
    """The checkpoint of output_dir that was completed (its marker written) since `start`, if any."""
    from sftdist.rundir import COMPLETE_MARKER

    markers = [m for m in Path(output_dir).glob(f"checkpoint-*/{COMPLETE_MARKER}") if m.stat().st_mtime >= start]
    return max(markers, key=lambda m: m.stat().st_mtime).parent.name if output_dir and markers else None


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


def run_launch(launch: Launch) -> int:
    """Run `accelerate launch` in this process and return the training processes' exit code.

    In-process, so the torchrun agent is this process: a signal sent to it (slurm, Ctrl-C) reaches
    the workers, and their failure is caught here with its exit code instead of a traceback.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.update(launch.env)
    # Until torchrun installs its own handlers (multi-process), and for the single-process launcher:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _forward_to_children)
    # Ctrl-C already reaches the training process (same process group); wait for it to save and exit.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    args = launch_command_parser().parse_args(launch.argv)
    started = time.time()
    try:
        launch_command(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = _exit_code(failure.exitcode) or 1
        if code not in (EXIT_USER_ERROR, EXIT_PREEMPTED):  # those ranks said what happened, in one line
            print(f"sftdist launch: rank {rank} exited with code {code}; see its output above", file=sys.stderr)
        return code
    except subprocess.CalledProcessError as e:
        return _exit_code(e.returncode) or 1
    except SignalException as e:
        # Ctrl-C reaches the workers too (one process group): like a scheduler's signal, they checkpoint and stop,
        # or, before training has begun, stop without writing anything. torchrun has waited for them by now.
        saved = _saved_since(launch.output_dir, started)
        if saved is not None:
            print(f"sftdist launch: stopped by {e.sigval.name} after the workers saved {saved}; run the same command "
                  "again to resume", file=sys.stderr)
            return EXIT_PREEMPTED
        print(f"sftdist launch: stopped by {e.sigval.name} before this launch saved a checkpoint; run the same "
              "command again", file=sys.stderr)
        return 128 + int(e.sigval)
    except ConnectionError as e:
        raise UserError(str(e).splitlines()[0]) from None
    return 0
