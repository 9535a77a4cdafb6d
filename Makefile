# The one-binary release build and an install onto a host's usual paths.
#
#   make release            dist/mm4relay: built with cargo-zigbuild against
#                           glibc $(GLIBC)'s symbols (runs on glibc $(GLIBC) or
#                           newer), OpenSSL built in and linked statically,
#                           stripped; installs cargo-zigbuild and zig (PyPI's
#                           ziglang) into the user's cargo and pip if missing;
#                           then check-release, recorded in dist/mm4relay.check
#   make check-release      fails if $(BIN) needs a glibc symbol newer than
#                           $(GLIBC) or links libssl/libcrypto
#   make install            installs $(BIN) and the files under conf/ below DESTDIR
#
# Variables: DESTDIR (empty), SBINDIR (/usr/local/sbin), BIN (dist/mm4relay),
# GLIBC (2.17).

DESTDIR ?=
SBINDIR ?= /usr/local/sbin
BIN ?= dist/mm4relay
# The account the relay drops to after binding its ports ([relay] user).
RELAY_USER ?= mm4relay
# The release build's glibc baseline and Rust target.
GLIBC ?= 2.17
RUST_TARGET ?= x86_64-unknown-linux-gnu
# cargo's output directory (CARGO_TARGET_DIR and .cargo/config honoured).
TARGET_DIR = $(shell cargo metadata --no-deps --format-version 1 | \
	sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')

.PHONY: release check-release install

release:
	packaging/release-tools
	cargo zigbuild --release --target $(RUST_TARGET).$(GLIBC) --features vendored-openssl
	mkdir -p dist
	strip -o dist/mm4relay $(TARGET_DIR)/$(RUST_TARGET)/release/mm4relay
	packaging/check-release dist/mm4relay $(GLIBC) > dist/mm4relay.check || \
		{ cat dist/mm4relay.check; exit 1; }
	cat dist/mm4relay.check

check-release: $(BIN)
	packaging/check-release $(BIN) $(GLIBC)

# A binary that is not there: say how to make one.
$(BIN):
	@echo "$(BIN) does not exist: run make release, or give BIN=target/release/mm4relay after cargo build --release" >&2
	@exit 1

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
