"""`python -m pipelines run CFG.yaml [--run-dir DIR] [--run-id ID] [--configs DIR]`

The process the console starts, detached, for every job (see pipelines/jobs/runner.py for
what it writes and its exit statuses). argparse, not typer: it starts a little faster and
this command is for programs more than for people.
"""

from __future__ import annotations

import argparse
import signal
import sys

# A SIGTERM (cancel) or SIGHUP that comes while the runner is still importing is kept here
# and honoured once the job would start. console.jobs.launch() starts us with both signals
# blocked, so none can arrive before this handler is in place (see main()).
EARLY_SIGNALS: list[int] = []
_CANCEL_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _remember(signum: int, frame: object) -> None:
    EARLY_SIGNALS.append(signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines",
                                     description="kyara's job runner")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one job config, writing its run directory")
    run.add_argument("config", help="a job YAML file (configs/jobs/*.yaml)")
    run.add_argument("--run-dir", help="where to write events.jsonl and the rest "
                                       "(default: $KYARA_HOME/runs/<name>-<time>-<id>)")
    run.add_argument("--run-id", help="the run's id (default: a new uuid4)")
    run.add_argument("--configs", help="the configs/ directory (default: KYARA_CONFIGS, "
                                       "./configs, or the packaged one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.processes import private

    private()  # umask 077: the run's files are its user's alone, however it was started
    args = build_parser().parse_args(argv)
    if args.command == "run":
        for signum in _CANCEL_SIGNALS:
            signal.signal(signum, _remember)
        # Delivers what was held back while the interpreter started (a no-op when started
        # by hand, with nothing blocked).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _CANCEL_SIGNALS)
        try:
            from pipelines.jobs.runner import main_run

            return main_run(args.config, args.run_dir, args.run_id, args.configs,
                            early_signals=EARLY_SIGNALS)
        except KeyboardInterrupt:  # Ctrl+C before or after the job (during it: cancelled)
            sys.stderr.write("kyara: interrupted\n")
            return 128 + signal.SIGINT
    return 2  # argparse already refused anything else


if __name__ == "__main__":
    sys.exit(main())
