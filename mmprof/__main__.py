from mmprof.cli import main

main()
