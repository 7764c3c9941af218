"""One gateway instance = a supervisor and N worker processes sharing ports.

Everything is checked and bound here before anything listens (stellagw/listeners.py): the
TLS files, the file-descriptor budget, every address — a port another process holds stops
start-up with "address in use". Then, with several workers, the supervisor forks them and
they serve on its sockets (one per worker in each port's SO_REUSEPORT group, plus each
worker's private transport port); no worker binds anything itself. The supervisor keeps its
copies, so a worker that dies is restarted (after a short backoff when it died young) onto
the same sockets, and what arrived for it meanwhile waits in their backlogs; so is one whose
event loop stopped turning (stellagw/watchdog.py). SIGTERM/SIGINT are forwarded and the
supervisor exits when all workers have.

SIGHUP reloads (stellagw/reload.py): the supervisor reads and checks the configuration file
once — a bad one is logged once, here — keeps the verdict for the workers it will start
from then on, writes it into the run directory and forwards SIGHUP; each worker applies it.
"""
from __future__ import annotations

import dataclasses
import os
import select
import shutil
import tempfile
import signal
import sys
import time

from . import reload
from .auth.replay import share_across_workers
from .gateway import check_httptools_strict, run_worker
from .listeners import bind_instance, raise_fd_limit
from .observe.logs import JsonLog
from .files import replace_atomically
from .observe.metrics import publish_supervisor
from .watchdog import Heartbeats


def _check_tls(settings) -> None:
    """Load every certificate now: a bad one is a configuration error (exit 2), not a
    worker that dies at start and is restarted for ever."""
    reload.check_certificates(settings)


def _with_ports(settings, sockets):
    """The settings with the ports really bound (port 0 resolved), as every worker and
    check of the effective configuration should see them."""
    gw = settings.gateway
    http = dataclasses.replace(gw.http, port=sockets.http.getsockname()[1])
    admin = gw.admin
    if sockets.admin is not None:
        admin = dataclasses.replace(admin, port=sockets.admin.getsockname()[1])
    transports = gw.transports
    seen = set()
    for kind, sock in sockets.transports:
        if kind in seen:
            continue   # the first of each kind is the public port
        seen.add(kind)
        transports = dataclasses.replace(transports, **{kind: dataclasses.replace(
            getattr(transports, kind), port=sock.getsockname()[1])})
    return dataclasses.replace(settings, gateway=dataclasses.replace(
        gw, http=http, admin=admin, transports=transports))


def _write_pid_file(path: str | None) -> None:
    if path:
        replace_atomically(path, b"%d\n" % os.getpid())
        try:
            os.unlink(reload.status_path(path))   # a verdict of a gateway that ran before
        except OSError:
            pass


def _remove_pid_file(path: str | None) -> None:
    # Only our own: a second gateway started on the same file owns it now.
    try:
        with open(path) as f:
            if int(f.read().strip() or 0) != os.getpid():
                return
        os.unlink(path)
        os.unlink(reload.status_path(path))
    except (OSError, ValueError, TypeError):
        pass


def serve(settings, source: "reload.ConfigSource | None" = None) -> int:
    """`source`: where `settings` came from, for SIGHUP; without one (settings made in
    code) a SIGHUP finds them unchanged and reloads certificates only."""
    # Until a handler is in, SIGHUP's default action would kill the gateway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if source is None:
        source = reload.ConfigSource(None, settings, reader=lambda kept=settings: kept)
    check_httptools_strict()
    _check_tls(settings)
    raise_fd_limit(settings)
    workers = settings.gateway.node.workers or os.cpu_count() or 1
    bundles = bind_instance(settings, workers)
    settings = _with_ports(settings, bundles[0])
    _write_pid_file(source.pid_file)
    try:
        if workers == 1:
            return run_worker(settings, 0, bundles[0], config_source=source)
        return _supervise(settings, source, workers, bundles)
    finally:
        _remove_pid_file(source.pid_file)


def _term_with_parent(parent: int) -> None:
    """In a worker: SIGTERM when the supervisor dies. A supervisor killed outright (SIGKILL,
    the OOM killer) left its workers serving on the ports, unwatched — no restart, no
    reload, no stall watchdog — and a new `serve` shared the ports with them. The worker
    drains as on any SIGTERM (still blocked here: it arrives once the worker handles it)."""
    import ctypes
    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return                  # not Linux: the old behaviour
    if os.getppid() != parent:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _wait_for_a_death(pidfds, timeout: float) -> None:
    """Until a worker's pidfd is readable (it died) or `timeout`. (A signal runs its handler
    and the wait goes on: PEP 475.)"""
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    poller.poll(timeout * 1000)


def _supervise(settings, source, workers: int, bundles) -> int:
    log = JsonLog(settings.gateway.logging.level)
    log.extra = {"node": settings.gateway.node.node_id, "role": "supervisor"}
    # Shared by the workers: instance-wide /metrics (observe/metrics.py) and what each
    # worker has routable, which a restarted worker waits for (gateway.py, warm start).
    run_dir = tempfile.mkdtemp(prefix="stellagw-run-")
    # Instance state (issue 16): one DPoP replay table for all workers, made before the first
    # fork so every worker, a restarted one too, inherits it (auth/replay.py).
    share_across_workers(settings.gateway.auth.replay_cache.max_entries)
    held = [sock for bundle in bundles for sock in bundle.all()]
    beats = Heartbeats(workers)     # made before the first fork: every worker writes into it
    # By reason: "died" (exited, or killed by anyone but us), "stalled" (the watchdog's kill).
    restarts = {"died": 0, "stalled": 0}

    def publish_restarts():
        try:
            publish_supervisor(run_dir, {"gateway_worker_restarts": (
                "Workers the supervisor restarted, by reason: died (exited or killed), "
                "stalled (its event loop stopped turning for node.workerStallTimeout)",
                ("reason",), [((reason,), n) for reason, n in restarts.items()])})
        except OSError as exc:      # the run directory is unusable: keep supervising
            log.event("error", "cannot publish worker restarts", error=str(exc))

    children: dict[int, int] = {}   # pid -> worker id
    pidfds: dict[int, int] = {}     # pid -> its pidfd: readable once the worker has died
    started: dict[int, float] = {}  # worker id -> start time
    stopping = False

    supervisor_pid = os.getpid()

    def spawn(worker_id: int) -> None:
        # A signal between fork and the child's own handlers would run `forward` (or
        # `reload_all`) in the child, which would signal its siblings: hold signals across
        # the fork.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK,
                                      {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        beats.beat(worker_id)      # judged from now: a worker hung at start is killed too
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                # Ignored until the worker's loop handles it; the worker then looks at the
                # last record itself, so a reload in between is not missed.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                _term_with_parent(supervisor_pid)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                for fd in pidfds.values():      # the supervisor's, not a worker's
                    os.close(fd)
                mine = {id(sock) for sock in bundles[worker_id].all()}
                for sock in held:
                    if id(sock) not in mine:
                        sock.close()
                code = run_worker(settings, worker_id, bundles[worker_id], run_dir=run_dir,
                                  config_source=source,
                                  heartbeat=lambda: beats.beat(worker_id))
            except BaseException as exc:  # the child must never return into the supervisor
                print(f"worker {worker_id} failed: {exc!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        children[pid] = worker_id
        started[worker_id] = time.monotonic()
        try:
            pidfds[pid] = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pass        # Linux < 5.3: its death is seen by polling (_wait_for_a_death)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def forward(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            # No more restarts: the workers' copies are now the last, so the ports close
            # when the workers close them (after preStopDelay), not when we exit.
            for sock in held:
                sock.close()
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    reloading = again = False

    def reload_all(signum, frame):
        # A SIGHUP that comes while one is handled runs this again, nested, between two
        # bytecodes of the first: both wrote one temporary file and one rename failed, which
        # ended the supervisor and left its workers unsupervised (a burst of 5 SIGHUPs 4 ms
        # apart). It is one more pass once the current one ends instead.
        nonlocal reloading, again
        if reloading:
            again = True
            return
        reloading = True
        try:
            again = True
            while again and not stopping:
                again = False
                try:
                    reload_once()
                except Exception as exc:  # noqa: BLE001
                    # Raised in a signal handler, it surfaced in the supervisor's wait loop,
                    # which then stopped every worker: a verdict file that could not be
                    # written (its directory full or read-only) took the gateway down on a
                    # SIGHUP. The workers run on with what they were told last;
                    # `stellagw reload` sees no verdict and says so.
                    log.event("error", "configuration reload failed in the supervisor",
                              error=repr(exc))
                    log.flush()
        finally:
            reloading = False

    def reload_once():
        nonlocal settings
        outcome = reload.check(source, settings)
        source.seq += 1
        outcome.seq = source.seq
        reload.log_outcome(log, source, outcome)
        if outcome.settings is not None:
            # Workers started from now on (a restart) run what the others were told to.
            settings = outcome.settings
        reload.accept(source, outcome)
        reload.write_record(run_dir, outcome)
        log.flush()
        # Forwarded whatever the verdict: each worker counts it, and reads its
        # certificates again.
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass
        reload.write_status(source, outcome)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, reload_all)
    log.event("info", "supervisor starting", workers=workers, pid=os.getpid())
    log.flush()
    publish_restarts()      # zeros from the start: increase() sees the first restart
    for i in range(workers):
        spawn(i)

    def kill_stalled():
        # watchdog.py: a worker whose loop stopped turning serves nothing and holds its
        # connections; killed, it is restarted below like any dead worker.
        timeout = settings.gateway.node.worker_stall_timeout    # a reload may change it
        if stopping or timeout <= 0:
            return
        now = time.monotonic()
        for pid, worker_id in list(children.items()):
            silent = beats.silent_for(worker_id, now)
            if silent > timeout and pid not in killed:
                killed.add(pid)
                log.event("error", "worker stalled; killing it", worker=worker_id, pid=pid,
                          silentSeconds=round(silent, 1))
                log.flush()
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # Workers to restart whose fork failed (EAGAIN at a cgroup's pids.max, ENOMEM under
    # memory pressure — often what killed the worker): tried again every pass. The fork's
    # OSError used to end the supervisor, which then stopped the workers still serving.
    unborn: set[int] = set()

    def respawn(worker_id: int) -> None:
        try:
            spawn(worker_id)
        except OSError as exc:
            if worker_id not in unborn:
                log.event("error", "cannot restart a worker; trying again every second",
                          worker=worker_id, error=repr(exc))
                log.flush()
            unborn.add(worker_id)
            return
        if worker_id in unborn:
            unborn.discard(worker_id)
            log.event("info", "worker restarted", worker=worker_id)
            log.flush()

    killed: set[int] = set()
    exit_code = 0
    try:
        while children or (unborn and not stopping):
            # Woken by a death (its pidfd) at once, or after a second to look at the
            # heartbeats; then every dead child is reaped.
            _wait_for_a_death(pidfds.values(), 1.0 if len(pidfds) == len(children) else 0.2)
            kill_stalled()
            for worker_id in sorted(unborn):
                if not stopping:
                    respawn(worker_id)
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    children.clear()
                    break
                if pid == 0:
                    break
                stalled = pid in killed
                killed.discard(pid)
                fd = pidfds.pop(pid, None)
                if fd is not None:
                    os.close(fd)
                worker_id = children.pop(pid, None)
                if worker_id is None:
                    continue
                code = os.waitstatus_to_exitcode(status)
                if stopping:
                    exit_code = exit_code or (code if code > 0 else 0)
                    continue
                log.event("error", "worker died; restarting", worker=worker_id, exit=code)
                log.flush()
                restarts["stalled" if stalled else "died"] += 1
                publish_restarts()
                if time.monotonic() - started[worker_id] < 1.0:
                    time.sleep(1.0)  # a crash loop must not spin the CPU
                if not stopping:
                    respawn(worker_id)
    except BaseException:
        # Whatever went wrong here, the workers must not outlive the supervisor unwatched:
        # they drain and stop (SIGTERM), and the error is the supervisor's exit.
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        raise
    finally:
        for sock in held:
            sock.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    log.event("info", "supervisor stopped")
    log.drain()
    return exit_code
