# mm4relay %post ($1: 1 install, 2 upgrade). Never enabled or started on
# install: the shipped configuration names no real peer (`mm4relay check`
# refuses it). An upgrade restarts a relay that is running.
# The user's directories (cargo-generate-rpm cannot package empty ones),
# when missing: an operator's changes are kept.
[ -d /var/spool/mm4relay ] || install -d -o mm4relay -g mm4relay -m 0700 /var/spool/mm4relay
[ -d /var/log/mm4relay ] || install -d -o mm4relay -g mm4relay -m 0750 /var/log/mm4relay
# Not the log file: root makes nothing in a directory the relay user owns
# (a link planted there would turn it on another file); the relay gives
# the file it makes at start to its user.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 2 ]; then
    if [ -d /run/systemd/system ] && systemctl is-active --quiet mm4relay.service; then
        systemctl restart mm4relay.service || echo "mm4relay: restart after the upgrade failed" >&2
    elif /etc/rc.d/init.d/mm4relay status >/dev/null 2>&1; then
        /etc/rc.d/init.d/mm4relay restart || echo "mm4relay: restart after the upgrade failed" >&2
    fi
else
    echo "mm4relay: not started. Configure /etc/mm4relay/mm4relay.ini, then: systemctl enable --now mm4relay"
fi
exit 0
