# mm4relay %preun ($1: 0 erase, 1 upgrade): an erase stops the relay (it
# drains; what is queued stays in the spool).
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl --no-reload disable --now mm4relay.service >/dev/null 2>&1 || :
    fi
    if [ -x /etc/rc.d/init.d/mm4relay ]; then
        /etc/rc.d/init.d/mm4relay stop || {
            echo "mm4relay: the relay did not stop; erase stopped (kill it, then retry)" >&2
            exit 1
        }
    fi
fi
exit 0
