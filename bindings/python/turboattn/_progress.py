"""Progress on long work (benchmark rows, calibration layers): a tqdm bar on stderr when tqdm is
installed (transformers brings it), else one line per step on stderr. stdout is left to the results."""
import sys
import time


class Progress:
    def __init__(self, total, desc, unit="row"):
        self.total, self.desc, self.done = total, desc, 0
        self._t0 = time.time()
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) if tqdm else None
        self._tqdm = tqdm

    def update(self, note="", n=1):
        self.done += n
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        else:
            print(f"{self.desc}: {self.done}/{self.total}{' ' + note if note else ''} ({time.time() - self._t0:.0f} s)",
                  file=sys.stderr, flush=True)

    def write(self, line):
        """A result line on stdout, printed above the bar instead of through it."""
        if self._bar is not None:
            self._tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
