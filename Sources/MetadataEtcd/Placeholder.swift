// placeholder: the etcd store goes here
