# mm4relay %pre: the system user, before the files that belong to it.
getent group mm4relay >/dev/null || groupadd -r mm4relay
getent passwd mm4relay >/dev/null ||
    useradd -r -g mm4relay -d /var/spool/mm4relay -M -s /sbin/nologin \
        -c "mm4relay MM4 relay" mm4relay
exit 0
