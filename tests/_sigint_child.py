"""``python -m ag_kernels`` as a child process that says when it is mid-run, for the real-SIGINT test.

    python tests/_sigint_child.py READY_FILE K -- <the CLI's arguments>

After K batches of images are written, when the next batch is about to be, it creates READY_FILE and
waits (at most 60 s): the parent's SIGINT, sent once READY_FILE exists, lands while the run is still
going, however fast or slow the machine is.  Everything else is the real command line (its entry point, its
signal handling, its exit status).
"""

import os
import sys
import time

from ag_kernels.sampling import generation


def main():
    ready, after, sep, *cli = sys.argv[1:]
    assert sep == "--", "usage: _sigint_child.py READY_FILE K -- ARGS..."
    after = int(after)
    write, batches = generation._write_pngs, []

    def wait_then_write(*args, **kwargs):
        if len(batches) == after:
            with open(ready + ".tmp", "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(ready + ".tmp", ready)  # the parent sees the file whole
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the SIGINT raises KeyboardInterrupt here
                time.sleep(0.01)
        batches.append(write(*args, **kwargs))
        return batches[-1]

    generation._write_pngs = wait_then_write
    from ag_kernels.commands.main import entry

    sys.argv = ["python -m ag_kernels", *cli]
    return entry()


if __name__ == "__main__":
    sys.exit(main())
