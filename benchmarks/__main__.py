from ._suite import main

main()
