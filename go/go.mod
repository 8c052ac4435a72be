module evesnap

go 1.19
