# mm4relay %postun ($1: 0 erase, 1 upgrade). The user, the spool (with
# what is queued) and the log stay; a modified configuration is kept as
# mm4relay.ini.rpmsave (and then so is /etc/mm4relay).
if [ "$1" -eq 0 ]; then
    rmdir /etc/mm4relay 2>/dev/null || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
