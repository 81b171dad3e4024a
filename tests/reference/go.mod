// The reference SIF tools (siftool, sifref), built offline by build.sh: every module is Debian's
// copy under /usr/share/gocode/src (golang-github-sylabs-sif-dev and the packages it depends on),
// so no module is ever downloaded.
module spank-sif/reference

go 1.19

require (
	github.com/spf13/cobra v1.6.1
	github.com/sylabs/sif/v2 v2.8.3
)

require (
	github.com/google/uuid v1.3.0 // indirect
	github.com/spf13/pflag v1.0.5 // indirect
)

replace (
	github.com/cpuguy83/go-md2man/v2 => /usr/share/gocode/src/github.com/cpuguy83/go-md2man/v2
	github.com/google/uuid => /usr/share/gocode/src/github.com/google/uuid
	github.com/russross/blackfriday/v2 => /usr/share/gocode/src/github.com/russross/blackfriday/v2
	github.com/spf13/cobra => /usr/share/gocode/src/github.com/spf13/cobra
	github.com/spf13/pflag => /usr/share/gocode/src/github.com/spf13/pflag
	github.com/sylabs/sif/v2 => /usr/share/gocode/src/github.com/sylabs/sif
	gopkg.in/yaml.v3 => /usr/share/gocode/src/gopkg.in/yaml.v3
)

// cobra and yaml.v3 name these modules, which Debian does not ship and Linux builds never compile
// (mousetrap is Windows-only, check.v1 is yaml's test framework): empty stand-ins satisfy the
// module graph.
replace (
	github.com/inconshreveable/mousetrap => ./unused/mousetrap
	gopkg.in/check.v1 => ./unused/check
)
