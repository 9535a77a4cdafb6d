# The one-binary release build, its packages, and an install onto a host's
# usual paths.
#
#   make release            dist/mm4relay: built with cargo-zigbuild against
#                           glibc $(GLIBC)'s symbols (runs on glibc $(GLIBC) or
#                           newer), OpenSSL built in and linked statically,
#                           stripped; installs cargo-zigbuild and zig (PyPI's
#                           ziglang) into the user's cargo and pip if missing;
#                           then check-release, recorded in dist/mm4relay.check
#   make check-release      fails if $(BIN) needs a glibc symbol newer than
#                           $(GLIBC) or links libssl/libcrypto
#   make docs               the man pages and bash/zsh completions of $(BIN)
#                           into target/docs/ (mm4relay man, mm4relay completions)
#   make deb                dist/mm4relay_VERSION-1_amd64.deb (cargo-deb) of $(BIN)
#   make rpm                dist/mm4relay-VERSION-1.x86_64.rpm (cargo-generate-rpm)
#   make install            installs $(BIN) and the files under conf/ below DESTDIR
#
# Variables: DESTDIR (empty), SBINDIR (/usr/local/sbin), BIN (dist/mm4relay;
# e.g. BIN=target/release/mm4relay to package a plain `cargo build --release`),
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
# What the packages are made of: the literal paths that Cargo.toml's
# [package.metadata.deb] and [package.metadata.generate-rpm] name.
STAGE = target/pkg
DOCS = target/docs
CARGO_DEB_VERSION ?= 3.8.0
CARGO_GENERATE_RPM_VERSION ?= 0.21.1

.PHONY: release check-release docs stage deb rpm install

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

# The man pages and completions come from the binary being packaged; made
# again when it changes.
docs: $(DOCS)/stamp
$(DOCS)/stamp: $(BIN)
	rm -rf $(DOCS)
	mkdir -p $(DOCS)/man8 $(DOCS)/completions
	$(BIN) man $(DOCS)/man8
	$(BIN) completions bash > $(DOCS)/completions/mm4relay
	$(BIN) completions zsh > $(DOCS)/completions/_mm4relay
	test -s $(DOCS)/man8/mm4relay.8
	test -s $(DOCS)/completions/mm4relay
	test -s $(DOCS)/completions/_mm4relay
	touch $@

# The binary (stripped) and the files of conf/ as the packages install them:
# the init script and the unit name /usr/sbin/mm4relay; the configuration
# runs as $(RELAY_USER) and names no real peer (packaging/mm4relay.ini.sed).
stage: $(BIN)
	rm -rf $(STAGE)
	mkdir -p $(STAGE)
	strip -o $(STAGE)/mm4relay $(BIN)
	sed 's|/usr/local/sbin/mm4relay|/usr/sbin/mm4relay|g' conf/init.d/mm4relay > $(STAGE)/mm4relay.init
	sed -e 's|/usr/local/sbin/mm4relay|/usr/sbin/mm4relay|g' \
		-e 's|^# systemd unit for mm4relay.*|# systemd unit for mm4relay, as the mm4relay package installs it.|' \
		conf/mm4relay.service > $(STAGE)/mm4relay.service
	sed -f packaging/mm4relay.ini.sed conf/mm4relay.ini > $(STAGE)/mm4relay.ini
	@# Every substitution must have found its line.
	! grep -n /usr/local $(STAGE)/mm4relay.init $(STAGE)/mm4relay.service
	grep -q '^DAEMON=$${DAEMON:-/usr/sbin/mm4relay}$$' $(STAGE)/mm4relay.init
	test "$$(grep -c '^hosts = ' $(STAGE)/mm4relay.ini)" = "$$(grep -c '^hosts = CHANGE-ME$$' $(STAGE)/mm4relay.ini)"
	grep -q '^hosts = CHANGE-ME$$' $(STAGE)/mm4relay.ini
	grep -q '^user = $(RELAY_USER)$$' $(STAGE)/mm4relay.ini
	grep -q '^group = $(RELAY_USER)$$' $(STAGE)/mm4relay.ini
	grep -q '^log_file = /var/log/mm4relay/mm4relay.log$$' $(STAGE)/mm4relay.ini
	grep -q '^control_socket = /var/spool/mm4relay/control.sock$$' $(STAGE)/mm4relay.ini

deb: stage docs
	@cargo deb --version >/dev/null 2>&1 || { echo "cargo-deb missing: cargo install --locked cargo-deb --version $(CARGO_DEB_VERSION)" >&2; exit 1; }
	mkdir -p dist
	rm -f dist/mm4relay_*.deb
	@# The variant whose Depends says glibc 2.17 only for a binary that
	@# passes check-release; any other gets what dpkg-shlibdeps finds.
	if packaging/check-release $(STAGE)/mm4relay 2.17 >/dev/null 2>&1; then \
		cargo deb --no-build --variant release --output dist/; \
	else \
		cargo deb --no-build --output dist/; \
	fi

rpm: stage docs
	@cargo generate-rpm --version >/dev/null 2>&1 || { echo "cargo-generate-rpm missing: cargo install --locked cargo-generate-rpm --version $(CARGO_GENERATE_RPM_VERSION)" >&2; exit 1; }
	mkdir -p dist
	rm -f dist/mm4relay-*.rpm
	cargo generate-rpm --payload-compress gzip --output dist/

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
