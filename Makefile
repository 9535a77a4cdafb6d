# The one-binary release build and an install onto a host's usual paths.
#
#   make release            target/release/mm4relay with OpenSSL built in
#                           and linked statically (runs without libssl),
#                           plus a stripped copy in dist/
#   make install            installs dist/mm4relay (or BIN=...) and the
#                           files under conf/ below DESTDIR
#
# Variables: DESTDIR (empty), SBINDIR (/usr/local/sbin), BIN.

DESTDIR ?=
SBINDIR ?= /usr/local/sbin
BIN ?= dist/mm4relay
# The account the relay drops to after binding its ports ([relay] user).
RELAY_USER ?= mm4relay

.PHONY: release install

release:
	cargo build --release --features vendored-openssl
	mkdir -p dist
	strip -o dist/mm4relay target/release/mm4relay

install:
	install -d -m 0755 $(DESTDIR)$(SBINDIR) $(DESTDIR)/etc/mm4relay \
		$(DESTDIR)/etc/init.d $(DESTDIR)/etc/systemd/system \
		$(DESTDIR)/etc/logrotate.d
	install -m 0755 $(BIN) $(DESTDIR)$(SBINDIR)/mm4relay
	# Never overwrite an operator's configuration; it may hold secrets: 0640.
	test -e $(DESTDIR)/etc/mm4relay/mm4relay.ini || \
		install -m 0640 conf/mm4relay.ini $(DESTDIR)/etc/mm4relay/mm4relay.ini
	install -m 0755 conf/init.d/mm4relay $(DESTDIR)/etc/init.d/mm4relay
	install -m 0644 conf/mm4relay.service $(DESTDIR)/etc/systemd/system/mm4relay.service
	install -m 0644 conf/logrotate.d/mm4relay $(DESTDIR)/etc/logrotate.d/mm4relay
	install -d -m 0700 $(DESTDIR)/var/spool/mm4relay
	install -d -m 0750 $(DESTDIR)/var/log/mm4relay
	@echo "installed; as root, for the [relay] user: chown $(RELAY_USER) /var/spool/mm4relay /var/log/mm4relay"
