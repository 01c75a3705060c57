# One command per product. `make deb` builds both Debian packages into build/deb/:
#   build/deb/picoord-agent_VERSION_all.deb, build/deb/picoord-coordinator_VERSION_all.deb
# with Debian's own toolchain (see packaging/deb/README.md); lintian errors fail it.
# Build dependencies: apt-get install $(grep -v '^#' scripts/system-packages.txt)

DEB_OUT ?= build/deb
# e.g. make deb DEB_VERSION=0.1.0+test1 (default: debian/changelog's version)
DEB_VERSION ?=

# `sudo make repo` adds build/deb's packages to the cluster's signed apt repository
# (packaging/apt/build-repo: apt-ftparchive and gpg), served by picoord-apt.service on
# port 8470; APT_URL is the address the nodes reach it at (printed in their setup lines).
# See docs/install.md.
APT_REPO ?= /var/lib/picoord-apt
APT_URL ?= http://DESKTOP:8470

.PHONY: deb clean-deb repo test-python312

deb:
	packaging/deb/build-debs --out $(DEB_OUT) $(if $(DEB_VERSION),--version $(DEB_VERSION))

clean-deb:
	rm -rf $(DEB_OUT)

repo:
	packaging/apt/build-repo --repo $(APT_REPO) --url $(APT_URL) $(wildcard $(DEB_OUT)/*.deb)

# tests/unit on Python 3.12 (Ubuntu 24.04's), in .venv-3.12.
test-python312:
	scripts/test-unit-python312
