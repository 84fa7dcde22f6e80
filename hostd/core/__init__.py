"""hostd's sans-IO core: values in, decisions out; no processes, no shared memory, no futexes.

* ``ring``: the submission queue, from published entries to arrivals and ring errors;
* ``scheduler``: the order tasks start in, and the policies (FIFO, round-robin, weighted);
* ``validate``: the checks on the one copy hostd takes of a descriptor;
* ``dispatch``: channels, register files and staged tasks, shadow loads and fair share;
* ``sessions``: session ids, their channels, the sessions lost with a worker or a restart;
* ``lifecycle``: a guest's states and the transitions between them;
* ``watchdog``: each running task's deadline.

The device loop (hostd/loop.py, hostd/device.py) does the loads, stores, CASes, wake-ups
and process work these decisions call for.
"""
