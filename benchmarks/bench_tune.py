"""Search: wall time for `tune` to come within 1% of the best validation loss, pruning vs no pruning.

    .venv/bin/python benchmarks/bench_tune.py [--smoke] [--pairs 3] [--trials 16] [--steps 10] [--eval-every 1]
                                              [--pruner median|successive_halving|hyperband] [--reduction-factor 3]
                                              [--space default|narrow] [--first-seed 0]
    .venv/bin/python benchmarks/bench_tune.py --replay benchmarks/results/tune-32-trials.json

After an unmeasured one-trial study (--warmup; the first training in a process pays seconds to
minutes of one-off costs), each round runs two fresh studies through loraflow's own tune.run, one
after the other, with the same sampler seed and trial budget: A with the pruner (loraflow's default, median,
unless --pruner says otherwise; validation loss every train.eval_steps), B with no pruner. Round i uses sampler
seed i (plus --first-seed: more rounds on new seeds, to pool with an earlier run's), so the rounds search
differently. The search space is loraflow's default tune.* (r 4-32, alpha multipliers 1 and 2, learning rate
1e-5..1e-3 on a log scale); --space narrow is the earlier rounds' (r 4/8/16, learning rate 1e-4..3e-3), where
nearly every trial lands close to the best. Target = 1.01 x the lowest validation loss either study of the
round found; an arm's time to target is from its tune.run call to the completion of its first trial
at or below the target (its whole wall time, flagged not reached, if none). Ratio = B / A: how many
times less time pruning needs (goal >= 2). Each round also gets the most any pruner could have got from
the unpruned study's trials (pruning_ceiling: a trial that ends as the best so far cannot be stopped by
what it has shown). Trials write to a throw-away MLflow store and journal.

Every trial's validation losses are recorded, so `--replay` can put the unpruned studies' trials, in their
order, through other pruner settings offline: what each would have saved on the same trials (the sampler
not fed their stopped values), a trial costing the fixed and per-step seconds fitted on the run's trials.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from loraflow.config import TuneConfig  # noqa: E402

DEFAULT_PRUNER = TuneConfig().pruner  # loraflow's own tune.pruner default
SPACES = {"default": {}, "narrow": {"r_choices": [4, 8, 16], "lr_low": 1e-4, "lr_high": 3e-3}}


def study_arm(cfg, trials: int, storage: str, counter: list, seeds: list | None = None) -> callable:
    """One fresh study of `trials` trials per call, the k-th call with sampler seed seeds[k] (else the config's);
    returns its trial timeline."""
    from loraflow import studies
    from loraflow.config import with_values
    from loraflow.stages import tune

    calls = [0]

    def run() -> dict:
        counter[0] += 1
        seed = seeds[calls[0]] if seeds else cfg.tune.sampler_seed
        calls[0] += 1
        name = f"bench-{cfg.tune.pruner}-{counter[0]}-seed{seed}"
        started = time.time()
        tune.run(with_values(cfg, {"tune.sampler_seed": seed}), n_trials=trials, study_name=name, storage=storage)
        wall = time.time() - started
        study = studies.load_study(name, storage)
        timeline = [{"number": t.number, "state": t.state.name, "value": t.value,
                     "done_after_seconds": t.datetime_complete.timestamp() - started if t.datetime_complete else None,
                     "reports": t.intermediate_values}  # step -> validation loss, for replay_pruner
                    for t in study.get_trials()]
        complete = [t["value"] for t in timeline if t["state"] == "COMPLETE"]
        return {"wall_seconds": wall, "sampler_seed": seed, "best_value": min(complete) if complete else float("inf"),
                "pruned": sum(t["state"] == "PRUNED" for t in timeline), "study": name, "trials": timeline}
    return run


def time_to_target(sample: dict, target: float) -> tuple[float, bool]:
    """Seconds until the first completed trial with value <= target (else the whole wall time, False)."""
    hits = [t["done_after_seconds"] for t in sample["trials"]
            if t["state"] == "COMPLETE" and t["value"] is not None and t["value"] <= target]
    return (min(hits), True) if hits else (sample["wall_seconds"], False)


def trial_seconds(sample: dict) -> list[tuple[dict, float]]:
    """(trial, seconds from the previous trial's end to its own) in trial order; the first from the study's start."""
    done = sorted((t for t in sample["trials"] if t["done_after_seconds"] is not None),
                  key=lambda t: t["done_after_seconds"])
    return [(t, t["done_after_seconds"] - (done[i - 1]["done_after_seconds"] if i else 0.0)) for i, t in enumerate(done)]


def pruning_ceiling(plain: dict, pruning: dict, target: float) -> dict | None:
    """How far any pruner could have cut the unpruned study's time to target, the trials it sampled kept.

    A pruner sees a trial only while it runs, so it cannot stop one that ends as the best so far: in the ideal
    study those run whole and every other trial before the target costs what a stopped trial cost in the pruned
    study (its median). Ratio = the unpruned time to target / that ideal time. None if the unpruned study never
    reached the target.
    """
    timeline = trial_seconds(plain)
    stopped = [seconds for trial, seconds in trial_seconds(pruning) if trial["state"] == "PRUNED"]
    stop_cost = statistics.median(stopped) if stopped else min(seconds for _, seconds in timeline)
    best, ideal, kept = float("inf"), 0.0, []
    for trial, seconds in timeline:
        if trial["state"] == "COMPLETE" and trial["value"] < best:
            best = trial["value"]
            ideal += seconds
            kept.append(trial["number"])
        else:
            ideal += stop_cost
        if trial["state"] == "COMPLETE" and trial["value"] <= target:
            return {"ratio": trial["done_after_seconds"] / ideal, "ideal_seconds": ideal,
                    "stopped_trial_seconds": stop_cost, "run_whole": kept, "target_trial": trial["number"]}
    return None


def timing_model(samples: list[dict]) -> tuple[float, float]:
    """(fixed seconds, seconds per reported step) of a trial: least squares over every finished trial of
    `samples` that reported; a stopped trial counts the steps it reported."""
    points = [(len(trial["reports"]), seconds) for sample in samples for trial, seconds in trial_seconds(sample)
              if trial.get("reports")]
    mean_steps = statistics.fmean(steps for steps, _ in points)
    mean_seconds = statistics.fmean(seconds for _, seconds in points)
    per_step = (sum((steps - mean_steps) * (seconds - mean_seconds) for steps, seconds in points)
                / sum((steps - mean_steps) ** 2 for steps, _ in points))
    return mean_seconds - per_step * mean_steps, per_step


def replay_pruner(plain: dict, pruner, target: float, timing: tuple[float, float]) -> float | None:
    """Seconds an unpruned study's trials, in their order, would take to reach `target` had `pruner` watched
    their recorded validation losses (None if they never do): what that pruner saves on the same trials, with
    no feedback of the stopped trials into the sampler. Each trial costs timing's fixed + per-step seconds
    for the steps it reports before it completes or is stopped."""
    import optuna

    fixed, per_step = timing
    study, elapsed = optuna.create_study(pruner=pruner), 0.0
    for recorded in sorted(plain["trials"], key=lambda t: t["number"]):
        if recorded["state"] != "COMPLETE":
            continue
        if not recorded.get("reports"):
            return None  # its losses were not recorded: the replay cannot go past it
        trial, steps = study.ask(), sorted(recorded["reports"], key=int)
        for done, step in enumerate(steps, 1):
            trial.report(recorded["reports"][step], int(step))
            if trial.should_prune():
                elapsed += fixed + per_step * done
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            elapsed += fixed + per_step * len(steps)
            study.tell(trial, recorded["value"])
            if recorded["value"] <= target:
                return elapsed
    return None


def replay(path: Path) -> dict:
    """`--replay RESULTS.json`: every pruner setting replayed on each round's unpruned study (same targets)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    record = json.loads(path.read_text())
    plain_samples = record["samples"]["no_pruning"]
    timing = timing_model(plain_samples + record["samples"]["pruning"])
    pruners = {"none": optuna.pruners.NopPruner,
               **{f"median, {n} startup trial(s)": lambda n=n: optuna.pruners.MedianPruner(n_startup_trials=n)
                  for n in (1, 2)},
               **{f"successive_halving, reduction factor {n}":
                  lambda n=n: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=n)
                  for n in (2, 3, 4)}}
    rounds = [{name: replay_pruner(plain, make(), target["target"], timing) for name, make in pruners.items()}
              for plain, target in zip(plain_samples, record["rounds"])]
    ratios = {name: [r["none"] / r[name] if r["none"] and r[name] else None for r in rounds] for name in pruners}
    print(f"{path.name}: a trial costs {timing[0]:.2f} s + {timing[1]:.2f} s per reported step")
    for name, values in ratios.items():
        shown = ", ".join(f"{v:.2f}x" if v else "never" for v in values)
        print(f"  {name}: {shown}; median {statistics.median(v or 0 for v in values):.2f}x")
    return {"timing": timing, "ratios": ratios}


def parse_args(argv=None):
    parser = common.base_parser(__file__, __doc__, pairs=3)
    parser.add_argument("--trials", type=int, default=None, help="trials per study (default 16; smoke 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per trial (default 10; smoke 2)")
    parser.add_argument("--eval-every", type=int, default=None, help="train.eval_steps (default 1)")
    parser.add_argument("--pruner", choices=("median", "successive_halving", "hyperband"),
                        default=DEFAULT_PRUNER, help=f"tune.pruner of arm A (default {DEFAULT_PRUNER}: loraflow's)")
    parser.add_argument("--reduction-factor", type=int, default=None,
                        help="tune.pruner_reduction_factor of successive halving (default loraflow's, 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="train.batch_size (default 2)")
    parser.add_argument("--eval-rows", type=int, default=8, help="validation rows of each report to the pruner")
    parser.add_argument("--space", choices=tuple(SPACES), default="default",
                        help="search space: loraflow's default tune.* or the narrower one of earlier rounds")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="sampler seed of the first round (round i: first + i); not 0 adds '-seeds-A-B' to the "
                             "results name, so further rounds of a setting are kept beside its first run's")
    parser.add_argument("--replay", type=Path, default=None,
                        help="replay the unpruned studies of a results JSON through several pruner settings, "
                             "offline (no training), and print each one's time-to-target ratio")
    args = common.parse(parser, argv)
    if args.reduction_factor and args.pruner != "successive_halving":
        parser.error("--reduction-factor is successive halving's: give --pruner successive_halving")
    args.trials = args.trials or (2 if args.smoke else 16)
    args.steps = args.steps or (2 if args.smoke else 10)
    args.batch_size = args.batch_size or 2
    args.eval_every = args.eval_every or 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replay:
        return replay(args.replay)
    common.use_temporary_tracking()
    model_path = common.model_for(args.smoke)
    storage = str(common.scratch_dir("bench-optuna-") / "journal.log")
    tune_settings = {"n_trials": args.trials, "sampler_seed": 0, "pruner_startup_trials": 1 if args.smoke else 2,
                     "sampler_startup_trials": 1 if args.smoke else 3, **SPACES[args.space]}
    train_settings = {"max_steps": args.steps, "eval_steps": args.eval_every, "save_steps": 10_000,
                      "eval_rows": args.eval_rows, "batch_size": args.batch_size}
    factor = {"pruner_reduction_factor": args.reduction_factor} if args.reduction_factor else {}
    configs = {name: common.bench_config(model_path, train=train_settings,
                                         tune={**tune_settings, "pruner": pruner, **(factor if pruning else {})})
               for name, pruner, pruning in (("pruning", args.pruner, True), ("no_pruning", "none", False))}
    searched = configs["pruning"].tune  # the space as the studies resolve it, for the record
    tune_settings.update(pruner=args.pruner, **factor, space=args.space, r_choices=searched.r_choices,
                         alpha_multipliers=searched.alpha_multipliers, lr_low=searched.lr_low, lr_high=searched.lr_high)
    counter = [0]
    for _ in range(args.warmup):  # a one-trial study pays the first-use costs (kernels, file cache) unmeasured
        study_arm(configs["pruning"], 1, storage, counter)()
    seeds = list(range(args.first_seed, args.first_seed + args.pairs))  # both arms of round i: the same seed
    arms = {name: study_arm(cfg, args.trials, storage, counter, seeds) for name, cfg in configs.items()}
    samples = common.alternate(arms, args.pairs, warmup=0)
    return report(args, model_path, samples, tune_settings, train_settings)


def report(args, model_path, samples, tune_settings, train_settings) -> dict:
    rounds = []
    for pruning, plain in zip(samples["pruning"], samples["no_pruning"]):
        target = 1.01 * min(pruning["best_value"], plain["best_value"])
        (a, a_hit), (b, b_hit) = time_to_target(pruning, target), time_to_target(plain, target)
        rounds.append({"target": target, "pruning_seconds": a, "pruning_reached": a_hit,
                       "no_pruning_seconds": b, "no_pruning_reached": b_hit,
                       "pruning_ceiling": pruning_ceiling(plain, pruning, target)})
    to_target = common.compare(common.column(rounds, "no_pruning_seconds"), common.column(rounds, "pruning_seconds"))
    wall = common.compare(common.column(samples["no_pruning"], "wall_seconds"),
                          common.column(samples["pruning"], "wall_seconds"))
    pruner = args.pruner + (f" (reduction factor {args.reduction_factor})" if args.reduction_factor else "")
    goals = [common.goal(f"time to within 1% of best: no pruning / {pruner} pruning >= 2",
                         to_target["ratio_median"], 2.0)]
    summary = [f"{args.trials} trials x {args.steps} steps, {pruner} pruner, {args.space} search space, sampler seeds "
               f"{[s['sampler_seed'] for s in samples['pruning']]}: time to within 1% of the best: no pruning "
               f"{to_target['a_median']:.0f} s vs pruning {to_target['b_median']:.0f} s = {to_target['ratio_median']:.2f}x "
               f"(min-max {to_target['ratio_min_max'][0]:.2f}-{to_target['ratio_min_max'][1]:.2f}); whole study "
               f"{wall['a_median']:.0f} s vs {wall['b_median']:.0f} s = {wall['ratio_median']:.2f}x; pruned trials "
               f"{[s['pruned'] for s in samples['pruning']]}; target reached by pruning in "
               f"{sum(r['pruning_reached'] for r in rounds)} of {len(rounds)} rounds; the most any pruner could have "
               f"got, each trial that ends best so far run whole: "
               + ", ".join(f"{r['pruning_ceiling']['ratio']:.2f}x" if r["pruning_ceiling"] else "-" for r in rounds)]
    payload = {"summary": summary, "model": model_path, "data": common.data_source()[0],
               "settings": {"trials": args.trials, "train": train_settings, "tune": tune_settings},
               "time_to_target_no_pruning_over_pruning": to_target, "wall_no_pruning_over_pruning": wall,
               "rounds": rounds, "best_value": {name: [s["best_value"] for s in arm] for name, arm in samples.items()},
               "pruned_trials": {name: [s["pruned"] for s in arm] for name, arm in samples.items()},
               "goals": goals, "samples": samples}
    # loraflow's default pruner at 16 trials is "tune"; another pruner or budget adds "-<pruner>", "-<n>-trials",
    # rounds not starting at seed 0 "-seeds-<first>-<last>"
    name = "tune" + ("" if args.pruner == DEFAULT_PRUNER else f"-{args.pruner.replace('_', '-')}") + (
        f"-factor-{args.reduction_factor}" if args.reduction_factor else "") + (
        "" if args.trials == 16 or args.smoke else f"-{args.trials}-trials") + (
        f"-seeds-{args.first_seed}-{args.first_seed + args.pairs - 1}" if args.first_seed else "")
    common.write_results(name, args, payload)
    return payload


if __name__ == "__main__":
    main()
