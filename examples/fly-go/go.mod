module example.com/go-fly-a-site

go 1.19
