// Stand-in for github.com/inconshreveable/mousetrap (see ../../go.mod): never compiled.
module unused/mousetrap
