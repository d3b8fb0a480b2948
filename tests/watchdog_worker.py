"""One end of the watchdog in its own process, for tests/test_watchdog.py.

    python tests/watchdog_worker.py listen TIMEOUT_S            # rank 0: prints its contact as JSON
    python tests/watchdog_worker.py connect RANK TIMEOUT_S JSON  # another rank: prints "ready"

Either then waits, stepping, until its watchdog ends the process (:func:`end_process`) or it is
killed; on stdin's end it stops cleanly (goodbye) and exits 0.
"""

import json
import socket
import sys
import threading
import time

from tsmtrain.dist.watchdog import Watchdog


def main() -> None:
    if sys.argv[1] == "listen":
        dog = Watchdog.listen(socket.gethostname(), float(sys.argv[2]), ["127.0.0.1"])
        print(json.dumps(dog.contact()), flush=True)
    else:
        dog = Watchdog.connect(int(sys.argv[2]), f"host-{sys.argv[2]}", json.loads(sys.argv[4]),
                               float(sys.argv[3]))
        print("ready", flush=True)
    ended = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), ended.set()), daemon=True).start()
    while not ended.is_set():
        dog.step = (dog.step or 0) + 1
        time.sleep(0.1)
    dog.stop()
    print("bye", flush=True)


if __name__ == "__main__":
    main()
