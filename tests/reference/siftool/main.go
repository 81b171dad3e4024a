// Command siftool is the reference SIF command line (header, list, info, dump, new, add, ...).
// Its commands live in the reference library's pkg/siftool; all this file adds is the root command.
package main

import (
	"os"

	"github.com/spf13/cobra"
	"github.com/sylabs/sif/v2/pkg/siftool"
)

func main() {
	root := &cobra.Command{Use: "siftool", Short: "reference SIF tool (github.com/sylabs/sif/v2)"}
	if err := siftool.AddCommands(root); err != nil {
		os.Exit(2)
	}
	if root.Execute() != nil {
		os.Exit(1) // cobra has already printed the error
	}
}
