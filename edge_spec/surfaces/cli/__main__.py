from edge_spec.surfaces.cli import main

main()
