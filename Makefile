# One command per product. `make deb` builds both Debian packages into build/deb/:
#   build/deb/picoord-agent_VERSION_all.deb, build/deb/picoord-coordinator_VERSION_all.deb
# with Debian's own toolchain (see packaging/deb/README.md); lintian errors fail it.
# Build dependencies: apt-get install $(grep -v '^#' scripts/system-packages.txt)

DEB_OUT ?= build/deb
# e.g. make deb DEB_VERSION=0.1.0+test1 (default: debian/changelog's version)
DEB_VERSION ?=

.PHONY: deb clean-deb

deb:
	packaging/deb/build-debs --out $(DEB_OUT) $(if $(DEB_VERSION),--version $(DEB_VERSION))

clean-deb:
	rm -rf $(DEB_OUT)
