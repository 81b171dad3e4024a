// Stand-in for gopkg.in/check.v1 (see ../../go.mod): never compiled.
module unused/check
