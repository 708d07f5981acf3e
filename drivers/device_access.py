"""Who opens a device, and whether they may: `duet doctor` asks for the follower's service
user (its unit's User=, Group=, SupplementaryGroups= and the user's groups), not for whoever
runs doctor (an operator is rarely in dialout, and needs not be)."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Account:
    name: str  # how doctor names it: "duet (the follower's user)", "you"
    uid: int
    gids: frozenset[int]

    @classmethod
    def caller(cls) -> Account:
        return cls(f"you (uid {os.getuid()})", os.getuid(), frozenset(
            {os.getgid(), *os.getgroups()}))

    @classmethod
    def service(cls, user: str, group: str | None, extra: list[str], role: str) -> Account:
        """The account systemd runs a unit as: User=, Group= (default: the user's primary
        group), the user's groups from /etc/group (initgroups), SupplementaryGroups=.
        KeyError when the user or a group does not exist."""
        entry = pwd.getpwnam(user)
        gids = {entry.pw_gid, *os.getgrouplist(user, entry.pw_gid)}
        gids |= {grp.getgrnam(g).gr_gid for g in ([group] if group else []) + extra}
        names = sorted(grp.getgrgid(g).gr_name for g in gids)
        return cls(f"{user} ({role}; groups {', '.join(names)})", entry.pw_uid,
                   frozenset(gids))

    def can_read_write(self, path: str | Path) -> bool:
        """As the kernel decides for a plain open(O_RDWR): root may; else the owner's, the
        group's or the others' bits, the first class that applies."""
        st = os.stat(path)
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            bits = stat.S_IRUSR | stat.S_IWUSR
        elif st.st_gid in self.gids:
            bits = stat.S_IRGRP | stat.S_IWGRP
        else:
            bits = stat.S_IROTH | stat.S_IWOTH
        return st.st_mode & bits == bits


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def owner_text(st: os.stat_result) -> str:
    """`root:dialout crw-rw----`, as ls shows a device node."""
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    return f"{user}:{group_name(st.st_gid)} {stat.filemode(st.st_mode)}"
