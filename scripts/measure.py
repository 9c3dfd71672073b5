"""What the measurement scripts share (redis-instructions-fixed, layout-floor, server-floor,
index-memory): free loopback ports, redis-servers started for one run (under callgrind when
counting), callgrind's instruction counter, and the service's own acquire function called
straight on Redis. Not a script of its own."""
import os
import socket
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def callgrind(cmd, tmp):
    """`cmd` under valgrind's callgrind, its output in `tmp`."""
    return subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out"] + cmd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_redis(tmp=None):
    """A throw-away redis-server on a free port (under callgrind when `tmp` is given): the
    process and a client, once it answers."""
    import redis

    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = callgrind(cmd, tmp) if tmp else subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(240):
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            time.sleep(0.25)
    raise SystemExit("redis-server did not start")


def acquire_function(binary, client):
    """Loads the function library the way the service does (`waquota serve`, then stopped), and
    names its acquire function."""
    srv = subprocess.Popen([binary, "serve", "--redis", f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}",
                            "--listen", f"127.0.0.1:{free_port()}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            libs = client.function_list()
            if libs:
                lib = dict(zip(libs[0][::2], libs[0][1::2]))  # RESP2 answers maps as flat lists
                names = [dict(zip(f[::2], f[1::2]))[b"name"] for f in lib[b"functions"]]
                return next(n for n in names if n.endswith(b"_acquire"))
            time.sleep(0.25)
        raise SystemExit("the server loaded no function library")
    finally:
        stop(srv)


def acquire(pipe, fn, sender, recipients, now):
    """Queues one Acquire(Batch) of `recipients` by `sender` at its own home, at `now`: KEYS and
    ARGV as lua/acquire.lua documents them, with the service's defaults."""
    base = f"wq:{{s:{sender}}}"
    keys = [f"{base}:w", f"{base}:wx", f"{base}:sp:{sender}", f"{base}:csw:{sender}", f"{base}:away",
            f"{base}:sp:{sender}", f"{base}:ws:{sender}", f"{base}:tp:{sender}", f"{base}:pr:{sender}",
            f"{base}:mk:{sender}", f"{base}:mh", f"{base}:uq", "wq:ledger"]
    args = [now, "s", sender, "t", "0", "0", "1k", "conversation", "portfolio", 80, 6000, 1,
            86_400_000, 3_600_000, "a", *recipients]
    pipe.execute_command("FCALL", fn, len(keys), *keys, *args)


def zero(pid):
    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True)


def instructions(pid):
    """Instructions the process under callgrind has executed since its counters were zeroed."""
    out = subprocess.run(["callgrind_control", "-e", "Ir", str(pid)], capture_output=True, text=True).stdout
    return sum(int(line.split()[2].replace(",", "")) for line in out.splitlines() if line.strip().startswith("Th"))


def counted(pid, work):
    """Instructions per unit of `work()`, which returns (units, what to report with them)."""
    zero(pid)
    before = instructions(pid)
    units, report = work()
    return (instructions(pid) - before) / units, report


def stop(proc):
    if proc and proc.poll() is None:
        proc.terminate()
        proc.wait()


# The fixed workload of redis-instructions-fixed and layout-floor, on one trusted clock.
T0 = 1_800_000_000_000  # the fill
T1 = T0 + 3_600_000  # the new recipients, an hour later: the fill's slots still live
T2 = T1 + 60_000  # the same recipients again, past their pair interval


def _code(reply, j=0):
    # A decision reply carries the decision of recipient j at 6 + 5j (lua/acquire.lua); the
    # anchor's reply is {code, ...}.
    return int(reply[6 + 5 * j] if len(reply) > 2 else reply[0])


def singles(pid, client, name, call, senders=100, n=1000):
    """`senders` senders with 20 slots each, then `n` new recipients and, a minute later, the same
    again (counted), each call alone, pipelined 100 at a time. `call(pipe, sender, recipient,
    now)` queues one decision. Prints instructions per decision."""
    import collections

    def run(items, now):
        codes = collections.Counter()
        for i in range(0, len(items), 100):
            pipe = client.pipeline(transaction=False)
            for sender, recipient in items[i:i + 100]:
                call(pipe, sender, recipient, now)
            codes.update(_code(reply) for reply in pipe.execute())
        return len(items), dict(sorted(codes.items()))

    ids = [f"s{i}" for i in range(senders)]
    run([(s, f"1555{j:07d}") for s in ids for j in range(20)], T0)
    fresh = [(ids[i % senders], f"1666{i:07d}") for i in range(n)]
    for label, now in (("new", T1), ("counted", T2)):
        per, codes = counted(pid, lambda: run(fresh, now))
        print(f"{name}, single decision, {label} recipient: {per:,.0f} instructions ({senders} senders; codes {codes})")


def batches(pid, client, name, call, senders=20):
    """`senders` other senders with a batch of 20 slots each, then one batch of 100 new recipients
    per sender and, a minute later, the same batches again. `call(pipe, sender, recipients, now)`
    queues one batch. Prints instructions per recipient."""
    import collections

    def run(per, now, prefix):
        pipe = client.pipeline(transaction=False)
        for k in range(senders):
            call(pipe, f"b{k}", [f"{prefix}{k * per + j:07d}" for j in range(per)], now)
        codes = collections.Counter(_code(x, j) for x in pipe.execute() for j in range(per))
        return senders * per, dict(sorted(codes.items()))

    run(20, T0, "1555")
    for label, now in (("new", T1), ("counted", T2)):
        per, codes = counted(pid, lambda: run(100, now, "1777"))
        print(f"{name}, batch of 100, {label} recipient: {per:,.0f} instructions per recipient "
              f"({senders} senders; codes {codes})")
