# conf/mm4relay.ini as the packages install it (make stage): the package's
# layout and user, and placeholder peer hosts that `mm4relay check` refuses,
# so that neither the init script nor the unit starts the relay (they run
# check first) until the operator has configured it. The Makefile checks
# that every substitution below found its line.
1a\
;\
; Installed by the mm4relay package. As shipped it does not start: each\
; peer's "hosts = CHANGE-ME" is refused by `mm4relay check`, which the init\
; script and the systemd unit run first. Set your peers (hosts, domains,\
; prefixes, local, accept_from) and the [listener], then:\
;     mm4relay check -c /etc/mm4relay/mm4relay.ini\
;     /etc/init.d/mm4relay start      (or: systemctl enable --now mm4relay)\
; The relay runs as user mm4relay (below), which owns /var/spool/mm4relay\
; and /var/log/mm4relay; the control socket is in the spool, so ask it with\
;     mm4relay status -c /etc/mm4relay/mm4relay.ini
s/^user =$/user = mm4relay/
s/^group =$/group = mm4relay/
s|^;log_file = /var/log/mm4relay/mm4relay.log$|log_file = /var/log/mm4relay/mm4relay.log|
s|^control_socket = /run/mm4relay.sock$|control_socket = /var/spool/mm4relay/control.sock|
s/^hosts = .*/hosts = CHANGE-ME/
