"""The nodes of a multi-node run: where this process sits, a check at the start that all nodes
share `output_dir`, and heartbeats, so that a node that dies stops the others with an error
instead of leaving them waiting on markers it will never write.

Nodes coordinate through files in the shared `output_dir`, like ranks do (`ranks.py`). Each
node's local rank 0 (its leader) writes a probe file at the start and then a heartbeat file
every `tms.nodes.heartbeat_s`. A heartbeat is a counter, not a timestamp: a reader notes when it
last saw the counter change by its own clock, so clocks that differ between machines do not
matter. Every wait on another node (`ranks.wait_for`, the harvest) checks the heartbeats.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tms_axolotl_plugin import ranks
from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.files import write_text_atomic
from tms_axolotl_plugin.logs import get_logger

LOG = get_logger(__name__)
PROBE_MARGIN_S = 5.0


def local_world_size() -> int:
    """Processes on this node (torchrun and `accelerate launch` set LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size()))


def num_nodes() -> int:
    size, local = ranks.world_size(), local_world_size()
    if local < 1 or size % local:
        raise TMSError(f"WORLD_SIZE={size} is not a multiple of LOCAL_WORLD_SIZE={local}: the "
                       "plugin needs the same number of processes on every node")
    return size // local


def node_rank() -> int:
    """This node's index, 0..num_nodes-1 (torchrun's GROUP_RANK)."""
    group = os.environ.get("GROUP_RANK")
    return int(group) if group is not None else ranks.rank() // local_world_size()


def is_node_leader() -> bool:
    return ranks.local_rank() == 0


def reachable_address() -> str:
    """This machine's address as the other nodes reach it: the local end of a route to the
    outer run's MASTER_ADDR (no packet is sent), or the hostname without one."""
    master = os.environ.get("MASTER_ADDR")
    if not master:
        return socket.getfqdn()
    try:
        family = socket.getaddrinfo(master, None)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
            return probe.getsockname()[0]
    except OSError:
        return socket.getfqdn()


@dataclass
class NodeWatch:
    """Probe, heartbeats and the liveness check of one multi-node launch (see the module
    docstring). With one node every method does nothing."""

    directory: Path
    heartbeat_s: float
    dead_after_s: float
    probe_timeout_s: float
    _count: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _seen: dict[int, tuple[str, float]] = field(default_factory=dict)
    _thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, markers: Path, nodes_config) -> NodeWatch:
        return cls(markers, nodes_config.heartbeat_s, nodes_config.dead_after_s,
                   nodes_config.probe_timeout_s)

    @property
    def active(self) -> bool:
        return num_nodes() > 1

    def _file(self, kind: str, node: int | None = None) -> Path:
        return ranks.launch_file(self.directory, "nodes" if node is None else f"node{node}",
                                 kind)

    def start(self) -> None:
        """Write this node's probe, start its heartbeats, and check that every node sees the
        same `output_dir`; raise, on every node, if one does not."""
        if not self.active:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if is_node_leader():
            write_text_atomic(self._file("probe", node_rank()),
                              f"{socket.gethostname()} pid {os.getpid()}\n")
            self._beat()
            self._thread = threading.Thread(target=self._beat_until_stopped,
                                            name="tms-heartbeat", daemon=True)
            self._thread.start()
        # Node leaders look for each other's probes (node 0 for all, the others for node 0's)
        # with deadlines from the same moment, the launch id's agreement; rank 0's is a little
        # later, so another node reports a missing probe while node 0's agent (which hosts the
        # launcher's store) is still up to let it.
        if ranks.rank() == 0:
            probes = [self._file("probe", node) for node in range(num_nodes())]
            if not _appear(probes, self.probe_timeout_s + PROBE_MARGIN_S):
                missing = [node for node, path in enumerate(probes) if not path.exists()]
                raise TMSError(self._not_shared(f"rank 0 ({socket.gethostname()}) saw no probe "
                                                f"file from node(s) {missing}"))
        elif is_node_leader() and not _appear([self._file("probe", 0)], self.probe_timeout_s):
            raise TMSError(self._not_shared(f"node {node_rank()} ({socket.gethostname()}) saw "
                                            "no probe file from node 0"))
        for node in range(num_nodes()):
            self._seen[node] = ("", time.monotonic())
        ranks.add_wait_check(self.check)
        LOG.info("tms nodes: %d nodes share %s", num_nodes(), self.directory)

    def _not_shared(self, what: str) -> str:
        return (f"output_dir must be on a filesystem shared by all nodes: {what} in "
                f"{self.directory} within {self.probe_timeout_s:.0f}s "
                "(tms.nodes.probe_timeout_s). Give every node the same output_dir on a shared "
                "filesystem (NFS, Lustre, a cluster volume); a node-local path cannot work.")

    def _beat(self) -> None:
        self._count += 1
        write_text_atomic(self._file("heartbeat", node_rank()), f"{self._count}\n")

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
            except OSError as error:  # a passing filesystem hiccup; others judge by staleness
                LOG.warning("tms nodes: could not write the heartbeat: %s", error)

    def check(self) -> None:
        """Raise if another node's heartbeat has not changed for `dead_after_s`."""
        if not self._seen:
            return
        now = time.monotonic()
        for node, (last, since) in list(self._seen.items()):
            if node == node_rank():
                continue
            try:
                beat = self._file("heartbeat", node).read_text()
            except OSError:
                beat = last
            if beat != last:
                self._seen[node] = (beat, now)
            elif now - since > self.dead_after_s:
                raise TMSError(
                    f"node {node} stopped: its heartbeat ({self._file('heartbeat', node).name}"
                    f" in {self.directory}) has not changed for {now - since:.0f}s "
                    f"(tms.nodes.dead_after_s: {self.dead_after_s:g}). It died or lost the "
                    "shared filesystem; stopping this node too. Run the same command again "
                    "once all nodes are up: finished stages are kept.")

def _appear(paths: list[Path], timeout_s: float, poll_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if all(path.exists() for path in paths):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
