module tbgateway/bench/loadgen

go 1.22
