"""The run folder: every file a training run writes, and the one object that reads and writes them.

    runs/expl-s0/
        lock                 the pid of the process writing the run (one writer at a time)
        train_config.json    every setting, resolved (paths absolute)
        metrics.jsonl        a row per logged step and per validation
        last/                adapter (or, for a full run, the model) + state.pt: what --resume continues
        best/                the adapter with the best validation (rating accuracy, -loss)
        done.json            written last: the run finished
        eval-<split>/        predictions.jsonl + metrics.json, written by eval.py
        replaced/            a run that --overwrite moved aside, until the new one saves a checkpoint

Checkpoints are written into `<name>.tmp/` and renamed; the folder they replace is first renamed to
`<name>.old/`, so a crash at any moment leaves a complete `last/` or `last.old/` to resume from.
Nothing outside this file types these names: train.py, eval.py, analysis.py, study.py and demo.py
go through `Run`. Left out: what goes into a checkpoint (the caller's `write` function), the
distributed agreement on a verdict (train.py).
"""
import functools
import hashlib
import json
import os
import shutil
import sys

import torch

from cli import Error, Lock, write_atomic

CONFIG, METRICS, DONE, LOCK = "train_config.json", "metrics.jsonl", "done.json", "lock"
LAST, BEST, STATE, REPLACED = "last", "best", "state.pt", "replaced"
SHARDS = "shards"  # inside a checkpoint of a --shard run: each rank's part of LoRA and AdamW (shard.py)
PREDICTIONS, SCORES = "predictions.jsonl", "metrics.json"
WEIGHTS = ("adapter_model.safetensors", "model.safetensors")  # what a checkpoint's fingerprint covers
# a run's own files: what --overwrite moves aside (with its eval-*/ folders)
RUN_FILES = (DONE, METRICS, CONFIG) + tuple(n + s for n in (LAST, BEST) for s in ("", ".old", ".tmp"))


class RunError(Error, RuntimeError):
    """A run folder that cannot be written or read as asked; the message says why and what was kept."""


def sha256(path):
    """sha256 of a file's contents (cached per path, size and modification time), None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path, size, mtime_ns):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(ckpt):
    """sha256 of a checkpoint's weights file: predictions are tied to the weights they came from."""
    for name in WEIGHTS:
        path = os.path.join(ckpt, name)
        if os.path.exists(path):
            return sha256(path)
    return None


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Run:
    """One run folder. Reading (config, checkpoint, metrics, scores) works from any process; writing
    (claim, save, log, finish) belongs to the process that holds the lock."""

    def __init__(self, path):
        self.path = path
        self.lock = Lock(self.file(LOCK))

    def file(self, *names):
        return os.path.join(self.path, *names)

    def __repr__(self):
        return f"Run({self.path!r})"

    # ------------------------------------------------------------------------- reading

    @property
    def is_run(self):
        return os.path.exists(self.file(CONFIG))

    @property
    def finished(self):
        return os.path.exists(self.file(DONE))

    @property
    def config(self):
        """train_config.json: every setting of the run."""
        if not self.is_run:
            raise RunError(f"{self.path}: not a run folder (no {CONFIG})")
        cfg = _read_json(self.file(CONFIG))
        if not isinstance(cfg, dict):
            raise RunError(f"{self.file(CONFIG)}: not a JSON object of settings")
        return cfg

    @property
    def done(self):
        """done.json (step, final validation, seconds), or None while the run is unfinished."""
        return _read_json(self.file(DONE))

    def metrics(self):
        """The rows of metrics.jsonl, up to a line a crash cut off."""
        rows = []
        if os.path.exists(self.file(METRICS)):
            with open(self.file(METRICS), encoding="utf-8") as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        break
        return rows

    def checkpoint(self, name=BEST):
        """The checkpoint folder to read: <run>/<name>, where a run trained without a validation split
        has no best/ and its last/ stands in."""
        ckpt = self.file(name)
        if name == BEST and not os.path.isdir(ckpt):
            ckpt = self.file(LAST)
        if not os.path.isdir(ckpt):
            raise RunError(f"{ckpt}: no such checkpoint (is the run finished?)")
        return ckpt

    def latest(self):
        """The newest checkpoint with a training state: last/, or last.old/ when a crash fell between
        the two renames of a save; None before the first save."""
        for name in (LAST, LAST + ".old"):
            if os.path.exists(self.file(name, STATE)):
                return self.file(name)
        return None

    def load_state(self):
        """(training state, its checkpoint folder) of the newest readable checkpoint, or (None, None)
        before the first. A state.pt cut short (a full disk, a dying machine) falls back to last.old."""
        found = [c for c in (self.file(LAST), self.file(LAST + ".old")) if os.path.exists(os.path.join(c, STATE))]
        for ckpt in found:
            try:
                return torch.load(os.path.join(ckpt, STATE), weights_only=True), ckpt
            except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors...
                print(f"warning: {ckpt}/{STATE} is unreadable ({str(e).splitlines()[0][:120]})", file=sys.stderr)
        if found:
            raise RunError(f"{self.path}: no readable checkpoint to resume from ({LAST}/{STATE} is corrupt and there "
                           f"is no {LAST}.old/); start again with --overwrite")
        return None, None

    def eval_dir(self, split):
        return self.file(f"eval-{split}")

    def predictions(self, split):
        return os.path.join(self.eval_dir(split), PREDICTIONS)

    def scores(self, split):
        """The metrics.json eval.py wrote for a split, or None (never scored, or cut off by a kill)."""
        return _read_json(os.path.join(self.eval_dir(split), SCORES))

    def scored_files(self, split):
        """What a finished, scored run is described by, relative to its folder (what a study publishes)."""
        return [CONFIG, DONE, os.path.join(f"eval-{split}", PREDICTIONS), os.path.join(f"eval-{split}", SCORES)]

    def stale_reason(self, split):
        """Why the run's saved predictions no longer describe what produced them (None: they do, or
        there are none). Scores record the sha256 of the predictions file, of the data file and of
        the checkpoint's weights: a hand-edited predictions file, relabelled data or a retrained run
        changes one of them (scores written before these were recorded are checked for what they
        record). The checkpoint is compared by its name in the run (best, last), so a folder scored
        from one directory and compared from another is not taken for a changed one."""
        path = os.path.join(self.eval_dir(split), SCORES)
        if not os.path.exists(path):
            return None
        saved = _read_json(path)
        if not isinstance(saved, dict):
            return f"its {SCORES} is unreadable"
        if saved.get("predictions_sha256") not in (None, sha256(self.predictions(split))):
            return f"{self.predictions(split)} is not the file that was scored (edited since)"
        data = saved.get("data")
        if saved.get("data_sha256") and data and os.path.exists(data) and sha256(data) != saved["data_sha256"]:
            return f"its data file {data} has changed since it was scored"
        if "checkpoint" not in saved:
            return None
        try:
            now = self.checkpoint()
        except RunError:
            return None
        if os.path.basename(os.path.normpath(saved["checkpoint"])) != os.path.basename(now):
            return f"it was scored from {saved['checkpoint']}, the run's checkpoint is now {now}"
        if fingerprint(now) != saved.get("checkpoint_sha256"):
            return f"{now} has changed since it was scored"
        return None

    # ------------------------------------------------------------------------- writing

    def write_scores(self, split, rows, metrics):
        """eval-<split>/predictions.jsonl and metrics.json (which records the predictions' sha256),
        each written whole or not at all."""
        os.makedirs(self.eval_dir(split), exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        write_atomic(self.predictions(split), text)
        metrics = dict(metrics, predictions_sha256=hashlib.sha256(text).hexdigest())
        write_atomic(os.path.join(self.eval_dir(split), SCORES), json.dumps(metrics, indent=2))

    def score_lock(self, split):
        """The lock a scoring takes on eval-<split>/: one writer of a run's predictions at a time."""
        return Lock(self.eval_dir(split) + ".lock", what=self.eval_dir(split))

    def clear_scores(self, split):
        shutil.rmtree(self.eval_dir(split), ignore_errors=True)

    def claim(self, settings, defaults, free, resume=False, overwrite=False):
        """Take the lock and decide what the folder's contents mean for a new run with `settings`:
        a finished or unfinished run is refused unless `resume` (with the same settings, except those
        named in `free`; a setting the saved run predates takes its value from `defaults`) or
        `overwrite`. Overwritten files are moved into replaced/ and deleted only when the new run has
        saved its first checkpoint; an overwrite interrupted before that is undone here first, so
        nothing is lost. The lock is released again when the claim is refused."""
        self.lock.acquire()
        try:
            self.restore_replaced()
            if overwrite:
                self._move_aside()
            elif self.finished and not resume:
                raise RunError(f"{self.path} holds a finished run; pass --overwrite to replace it")
            elif self.latest() and not resume:
                raise RunError(f"{self.path} holds an unfinished run ({self.latest()}); pass --resume to continue "
                               "it or --overwrite to start again")
            elif self.latest():
                self._check_same(settings, defaults, free)
        except BaseException as e:
            self.lock.release()
            if isinstance(e, OSError):
                raise RunError(f"{self.path}: cannot prepare the run folder ({e})") from None
            raise

    def _move_aside(self):
        replaced = self.file(REPLACED)
        shutil.rmtree(replaced, ignore_errors=True)
        names = [n for n in os.listdir(self.path) if n in RUN_FILES or n.startswith("eval-")]
        if names:
            os.makedirs(replaced)
            for name in names:  # predictions of the old model (eval-*/) go with it
                os.replace(self.file(name), os.path.join(replaced, name))

    def _check_same(self, settings, defaults, free):
        saved = _read_json(self.file(CONFIG))
        if saved is None and not os.path.exists(self.file(CONFIG)):
            return  # killed before its settings were written: nothing to compare
        if not isinstance(saved, dict):
            raise RunError(f"{self.file(CONFIG)}: unreadable (not a JSON object of settings); nothing to check "
                           "the resume against: --overwrite to start again")
        diff = [f"--{k.replace('_', '-')} {saved.get(k, defaults.get(k))!r} -> {v!r}" for k, v in settings.items()
                if k not in free and (k in saved or k in defaults) and saved.get(k, defaults.get(k)) != v]
        if diff:
            raise RunError(f"{self.path}: --resume with settings that differ from the saved run ({'; '.join(diff)}); "
                           f"resume with the saved ones, or --overwrite to start again (free to change on resume: "
                           f"{', '.join('--' + k.replace('_', '-') for k in free)})")

    def restore_replaced(self):
        """Undo an --overwrite that stopped before the new run saved a checkpoint: the old run comes back."""
        replaced = self.file(REPLACED)
        if not os.path.isdir(replaced) or self.latest() is not None:
            return
        for name in os.listdir(replaced):
            mine = self.file(name)  # what the failed run left (its metrics, config)
            if os.path.isdir(mine):
                shutil.rmtree(mine)
            elif os.path.exists(mine):
                os.remove(mine)
            os.replace(os.path.join(replaced, name), mine)
        os.rmdir(replaced)
        print(f"restored the run in {self.path} that an unfinished --overwrite had moved aside", file=sys.stderr)

    def release(self):
        self.lock.release()

    def write_config(self, settings):
        write_atomic(self.file(CONFIG), json.dumps(settings, indent=2))

    def keep_metrics_until(self, step):
        """Drop the rows a crashed run logged after its last checkpoint (and a line the crash cut off)."""
        write_atomic(self.file(METRICS), "".join(json.dumps(r) + "\n" for r in self.metrics() if r["step"] <= step))

    def log(self, row):
        """Append a row to metrics.jsonl; a write that fails (disk full) is one error."""
        try:
            with open(self.file(METRICS), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # the checkpoints on disk stay as they are
            raise RunError(f"{self.file(METRICS)}: cannot append ({e.strerror or e}); the checkpoints in "
                           f"{self.path} are intact, continue with --resume once there is room") from None

    def stage(self, name):
        """<run>/<name>.tmp/, empty: where a checkpoint is written before save() renames it into place.
        (A sharded run stages it first, so that every rank can write its shards there.)"""
        tmp = self.file(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return tmp

    def save(self, name, write, state=None, staged=False):
        """Write <run>/<name>/ through <name>.tmp/: write(folder) puts the weights there, `state` (what
        --resume needs) goes into state.pt. The old folder is moved aside before the new one takes its
        name, then removed. The first save of last/ retires a run that --overwrite moved aside.
        staged: <name>.tmp/ was made by stage() and holds what the ranks wrote; keep it."""
        final, tmp, old = (self.file(name + s) for s in ("", ".tmp", ".old"))
        try:
            if not staged:
                self.stage(name)
            write(tmp)
            if state is not None:
                torch.save(state, os.path.join(tmp, STATE))
        except Error:  # the writer's own refusal (non-finite weights, say): nothing is kept
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except (OSError, RuntimeError) as e:  # disk full (torch.save says so as a RuntimeError), read-only
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"{final} from before is intact" if os.path.exists(final) else f"nothing was saved under {final}"
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise RunError(f"{tmp}: cannot write the checkpoint ({reason}); {kept}") from None
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if name == LAST:
            shutil.rmtree(self.file(REPLACED), ignore_errors=True)

    def finish(self, info):
        """done.json: the run is finished."""
        write_atomic(self.file(DONE), json.dumps(info, indent=2))
